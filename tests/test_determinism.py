"""The same inputs and seed give byte-identical files, from separate processes.

Each run is its own Python process (as two CI jobs would be), with a different
``PYTHONHASHSEED``, so neither set/dict order nor safetensors' per-process hash seed (it
writes its metadata in HashMap order) nor the clock can leak into an artifact. Times are
recorded only when ``SOURCE_DATE_EPOCH`` says which.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tedepr_cli.artifact import MANIFEST_FILE, save_artifact

from .conftest import LENET300, MNIST, ROOT, run_cli

# every command that writes files, run in order inside one process; relative outputs so
# that the paths recorded in manifests are the same in both runs
PIPELINE = [
    ["decompose", LENET300, "--arch", "lenet300", "--rank", "4", "--seed", "3", "-o", "d"],
    ["decompose", LENET300, "--arch", "lenet300", "--rank", "4", "--seed", "3", "-o", "d.safetensors"],
    ["prune", LENET300, "--arch", "lenet300", "--sparsity", "0.995", "--data", MNIST, "--seed", "7",
     "-o", "p"],
    ["finetune", "p", "--data", MNIST, "--epochs", "2", "--limit-train", "256", "--seed", "7", "-o", "f"],
    ["export", "p", "--data", MNIST, "--to", "safetensors,onnx,onnx-sparse", "-o", "e"],
]

# Commands run in one process (one interpreter start instead of five), each from a
# random-number state drawn from the OS as a fresh process would have: torch, numpy and
# random all seed themselves from OS entropy at start-up.
DRIVER = """
import json, random, sys
import numpy as np, torch
from tedepr_cli.cli import app
for argv in json.loads(sys.argv[1]):
    torch.seed(); np.random.seed(); random.seed()
    code = app(argv, standalone_mode=False)
    if code:
        sys.exit(f"{argv[0]} exited {code}")
"""


def _run_pipeline(where: Path, hash_seed: int) -> subprocess.CompletedProcess:
    where.mkdir()
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "PYTHONPATH": str(ROOT)}
    env.pop("SOURCE_DATE_EPOCH", None)
    argv = json.dumps([[str(a) for a in cmd] + ["-q"] for cmd in PIPELINE])
    return subprocess.run([sys.executable, "-c", DRIVER, argv], cwd=where, env=env, capture_output=True,
                          text=True, timeout=900)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_processes_write_byte_identical_files(tmp_path):
    runs = []
    for i in range(2):
        r = _run_pipeline(tmp_path / f"run{i}", hash_seed=i)
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(_files(tmp_path / f"run{i}"))
    a, b = runs
    expected = {"d/model.safetensors", "d/manifest.json", "d.safetensors", "p/model.safetensors",
                "p/manifest.json", "f/best/model.safetensors", "f/best/manifest.json",
                "f/last/model.safetensors", "f/last/manifest.json", "f/metrics.jsonl", "f/state.pt",
                "e/model.safetensors", "e/model.onnx", "e/model.sparse.onnx", "e/sample_inputs.npy",
                "e/sample_outputs.npy", "e/export.json"}
    assert set(a) == set(b) == expected
    differ = [name for name in sorted(a) if a[name] != b[name]]
    assert differ == [], f"files differ between identical runs: {differ}"
    # nothing run-dependent is stored: no clock, no durations
    manifest = json.loads(a["f/best/manifest.json"])
    assert all("time" not in h for h in manifest["history"])
    assert "score_seconds" not in manifest["pruning"]
    assert "seconds" not in manifest["training"]["last_metrics"]
    assert all("seconds" not in json.loads(line) for line in a["f/metrics.jsonl"].decode().splitlines())


def test_metadata_order_is_canonical_within_a_process(tmp_path):
    """safetensors seeds every HashMap anew, so even saves in one process would differ."""
    from tedepr_cli.arch import parse_arch
    from tedepr_cli.loading import load_model

    art = load_model(LENET300, parse_arch("lenet300"))
    blobs = set()
    for i in range(12):
        blobs.add(save_artifact(art, tmp_path / f"a{i}.safetensors").read_bytes())
    assert len(blobs) == 1
    blob = next(iter(blobs))
    head = blob[8:8 + int.from_bytes(blob[:8], "little")]
    assert head.index(b'"tedepr.encoding"') < head.index(b'"tedepr.manifest"')  # sorted keys


def test_source_date_epoch_is_the_only_time_recorded(tmp_path, monkeypatch):
    args = ["prune", LENET300, "--arch", "lenet300", "--sparsity", "0.99", "--criterion", "magnitude",
            "--json"]
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    r = run_cli(*args, "-o", tmp_path / "plain")
    assert r.exit_code == 0, r.stderr
    assert "score_seconds" in json.loads(r.stdout)  # durations go to the --json output
    history = json.loads((tmp_path / "plain" / MANIFEST_FILE).read_text())["history"]
    assert [h["command"] for h in history] == ["decompose", "prune"]
    assert all("time" not in h for h in history)

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    r = run_cli(*args, "-o", tmp_path / "dated")
    assert r.exit_code == 0, r.stderr
    history = json.loads((tmp_path / "dated" / MANIFEST_FILE).read_text())["history"]
    assert {h["time"] for h in history} == {"2023-11-14T22:13:20+00:00"}
    r = run_cli("info", tmp_path / "dated")
    assert r.exit_code == 0 and "2023-11-14T22:13:20+00:00" in r.stdout

    for bad in ("yesterday", "-5", "1.5e9"):
        monkeypatch.setenv("SOURCE_DATE_EPOCH", bad)
        r = run_cli(*args, "-o", tmp_path / "bad")
        assert r.exit_code == 4 and "SOURCE_DATE_EPOCH" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "bad").exists()
