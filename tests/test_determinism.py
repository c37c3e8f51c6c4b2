"""The same command with the same seed writes byte-identical tensors (timestamps live only
in the manifest's history)."""

from __future__ import annotations

import json

from tedepr_cli.artifact import META_ENCODING, read_safetensors

from .conftest import LENET300, MNIST, run_cli


def _strip_times(obj):
    if isinstance(obj, dict):
        return {k: _strip_times(v) for k, v in obj.items() if k not in ("time", "score_seconds", "seconds",
                                                                          "examples_per_s")}
    if isinstance(obj, list):
        return [_strip_times(v) for v in obj]
    return obj


def test_same_seed_same_artifact_bytes(tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"p{i}"
        r = run_cli("prune", LENET300, "--arch", "lenet300", "--sparsity", "0.995", "--data", MNIST,
                    "--seed", "7", "-o", out)
        assert r.exit_code == 0, r.stderr
        r = run_cli("finetune", out, "--data", MNIST, "--epochs", "2", "--limit-train", "512", "--seed", "7",
                    "-o", tmp_path / f"f{i}")
        assert r.exit_code == 0, r.stderr
        outs.append(tmp_path / f"f{i}" / "best")
    (ta, ma), (tb, mb) = (read_safetensors(o / "model.safetensors") for o in outs)
    assert ta.keys() == tb.keys()
    for k in ta:  # byte-identical tensors
        assert ta[k].dtype == tb[k].dtype and ta[k].numpy().tobytes() == tb[k].numpy().tobytes(), k
    assert ma[META_ENCODING] == mb[META_ENCODING]
    a = _strip_times(json.loads((outs[0] / "manifest.json").read_text()))
    b = _strip_times(json.loads((outs[1] / "manifest.json").read_text()))
    a["training"]["last_metrics"].pop("seconds", None)

    def norm(m, i):
        return json.dumps(m, sort_keys=True).replace(str(tmp_path / f"p{i}"), "P").replace(
            str(tmp_path / f"f{i}"), "F")

    assert norm(a, 0) == norm(b, 1)
