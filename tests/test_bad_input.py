"""Every bad input, on every command: one clear line on stderr (no traceback), the
documented exit code, and nothing partial written.

Each case is (id, argv, expected exit code, a fragment of the message). ``{out}`` in the
argv is an output path that must not exist afterwards; ``{f:NAME}`` is a fixture file made
by :func:`fixtures`.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from tedepr_cli.errors import EXIT_CODES

from .conftest import LENET300, MNIST, run_cli

M = str(LENET300)
D = str(MNIST)
A = ["--arch", "lenet300"]


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """Broken inputs of every kind, built once."""
    d = tmp_path_factory.mktemp("bad")
    from tedepr_cli.arch import parse_arch
    from tedepr_cli.artifact import save_artifact
    from tedepr_cli.loading import load_model
    from tedepr_cli.pruning.prune import PruneOptions, prune

    good = load_model(LENET300, parse_arch("lenet300"))
    files = {}

    def put(name, data):
        p = d / name
        p.write_bytes(data)
        files[name] = p

    raw = LENET300.read_bytes()
    put("empty.pt", b"")
    put("trunc.pt", raw[: len(raw) // 3])
    # seeded, and starting with text: random bytes were sometimes read as a pickle (exit 5)
    put("garbage.pt", b"not a checkpoint\n" + random.Random(4).randbytes(2000))
    put("empty.safetensors", b"")
    art_dir = save_artifact(good, d / "art")
    st = (art_dir / "model.safetensors").read_bytes()
    put("trunc.safetensors", st[: len(st) // 2])
    put("hdr.safetensors", (10**12).to_bytes(8, "little") + b"{}")
    put("empty.pt2", b"")
    put("trunc.pt2", b"PK\x03\x04" + os.urandom(100))
    put("model.onnx", b"\x08\x07")
    state = good.model.state_dict()
    for name, edit in {
        "missing.pt": lambda s: s.pop("fc2.bias"),
        "unexpected.pt": lambda s: s.__setitem__("extra.w", torch.zeros(2)),
        "misshaped.pt": lambda s: s.__setitem__("fc3.weight", torch.zeros(3, 100)),
        "nan.pt": lambda s: s["fc1.weight"].__setitem__((0, 0), float("nan")),
        "inf.pt": lambda s: s["fc2.weight"].__setitem__((0, 0), float("inf")),
    }.items():
        s = {k: v.clone() for k, v in state.items()}
        edit(s)
        torch.save(s, d / name)
        files[name] = d / name
    torch.save({"fc1.weight": torch.zeros(1), "x": Evil(d / "pwned")}, d / "evil.pt")
    files["evil.pt"] = d / "evil.pt"
    torch.manual_seed(0)
    from tedepr_cli.zoo import MODELS

    torch.save(MODELS.get("lenet300")().state_dict(), d / "init.pt")  # magnitude-at-init collapses
    files["init.pt"] = d / "init.pt"
    torch.save(good.model, d / "module.pt")
    files["module.pt"] = d / "module.pt"
    with open(d / "raw.pkl", "wb") as f:
        pickle.dump({"a": Evil(d / "pwned")}, f)
    files["raw.pkl"] = d / "raw.pkl"
    # manifests: wrong types, unknown schema version, path escape
    for name, edit in {
        "badtype": lambda m: m.update(history="yes"),
        "future": lambda m: m.update(schema_version=99),
        "noarch": lambda m: m.pop("arch"),
        "importarch": lambda m: m.update(arch={"name": "os:system", "kwargs": {}}),
    }.items():
        a = save_artifact(good, d / f"m-{name}")
        m = json.loads((a / "manifest.json").read_text())
        edit(m)
        _rewrite_manifest(a, m)
        files[f"m-{name}"] = a
    esc = d / "escape"
    esc.mkdir()
    (esc / "model.safetensors").symlink_to(art_dir / "model.safetensors")
    files["escape"] = esc
    # data
    np.savez(d / "shape.npz", x=np.zeros((20, 5, 5), np.uint8), y=np.zeros(20, np.int64))
    np.savez(d / "labels.npz", x=np.zeros((20, 28, 28), np.uint8), y=np.full(20, 42))
    np.savez(d / "float_labels.npz", x=np.zeros((20, 28, 28), np.uint8), y=np.zeros(20))
    np.savez(d / "empty.npz", x=np.zeros((0, 28, 28), np.uint8), y=np.zeros(0, np.int64))
    np.savez(d / "nodata.npz", a=np.zeros(3))
    np.savez(d / "strings.npz", x=np.array(["a"] * 20), y=np.zeros(20, np.int64))
    np.savez(d / "negative.npz", x=np.zeros((20, 28, 28), np.uint8), y=np.full(20, -1))
    for n in ("shape.npz", "labels.npz", "float_labels.npz", "empty.npz", "nodata.npz", "strings.npz",
              "negative.npz"):
        files[n] = d / n
    pruned, _ = prune(good, PruneOptions(sparsity=0.99, criterion="magnitude"))
    files["pruned"] = save_artifact(pruned, d / "pruned")
    files["dec"] = d / "pruned"  # already decomposed too
    for name, blob in (("onnx-empty", b""), ("onnx-trunc", b"\x08\x07\x12\x04ab")):
        e = d / name
        e.mkdir()
        np.save(e / "sample_inputs.npy", np.zeros((1, 784), np.float32))
        np.save(e / "sample_outputs.npy", np.zeros((1, 10), np.float32))
        (e / "model.onnx").write_bytes(blob)
        files[name] = e
    files["exists"] = d / "exists"
    (d / "exists").mkdir()
    files["afile"] = d / "afile"
    (d / "afile").write_text("x")
    ro = d / "readonly"
    ro.mkdir()
    ro.chmod(0o500)
    files["readonly"] = ro
    files["dir"] = d
    files["pwned"] = d / "pwned"
    return files


def _rewrite_manifest(art_dir, manifest):
    """Edit both copies of the manifest consistently (a tampered but self-consistent artifact)."""
    from safetensors.torch import load_file, save_file

    from tedepr_cli.artifact import META_ENCODING, META_MANIFEST, read_safetensors

    p = art_dir / "model.safetensors"
    _, meta = read_safetensors(p)
    tensors = load_file(str(p))
    meta = {**meta, META_MANIFEST: json.dumps(manifest)}
    save_file(tensors, str(p), metadata={k: meta[k] for k in (META_MANIFEST, META_ENCODING)})
    (art_dir / "manifest.json").write_text(json.dumps(manifest))


P = "{f:%s}"
CASES = [
    # --- missing / wrong kind of input file
    ("info-missing", ["info", "{f:dir}/nope.pt", *A], 3, "does not exist"),
    ("info-dir-not-artifact", ["info", "{f:dir}", *A], 3, "not a tedepr artifact"),
    ("info-empty-pt", ["info", P % "empty.pt", *A], 4, "not a PyTorch file (torch.save): it is empty"),
    ("info-trunc-pt", ["info", P % "trunc.pt", *A], 4, "truncated or damaged"),
    ("info-garbage-pt", ["info", P % "garbage.pt", *A], 4, "not a PyTorch file"),
    ("info-empty-st", ["info", P % "empty.safetensors", *A], 4, "safetensors"),
    ("info-trunc-st", ["info", P % "trunc.safetensors", *A], 4, "safetensors"),
    ("info-header-st", ["info", P % "hdr.safetensors", *A], 4, "header"),
    ("info-empty-pt2", ["info", P % "empty.pt2", *A], 4, "torch.export"),
    ("info-trunc-pt2", ["info", P % "trunc.pt2", *A], 4, "torch.export"),
    ("info-onnx-input", ["info", P % "model.onnx", *A], 4, "ONNX"),
    ("info-no-arch", ["info", M], 4, "--arch"),
    ("info-unknown-arch", ["info", M, "--arch", "alexnet"], 2, "unknown architecture"),
    ("info-kwargs-json", ["info", M, *A, "--arch-kwargs", "{x"], 2, "not valid JSON"),
    ("info-kwargs-list", ["info", M, *A, "--arch-kwargs", "[1]"], 2, "JSON object"),
    ("info-kwargs-unknown", ["info", M, *A, "--arch-kwargs", '{"depth": 3}'], 4, "depth"),
    ("info-kwargs-value", ["info", M, *A, "--arch-kwargs", '{"num_classes": -1}'], 4, "positive"),
    ("info-kwargs-no-arch", ["info", M, "--arch-kwargs", "{}"], 2, "--arch"),
    ("info-import-bad", ["info", M, "--arch", "nosuchpkg.mod:fn"], 2, "cannot import"),
    ("info-import-form", ["info", M, "--arch", "a:b:c"], 2, "pkg.module:callable"),
    ("info-input-shape", ["info", M, *A, "--input-shape", "a,b"], 2, "--input-shape"),
    ("info-missing-key", ["info", P % "missing.pt", *A], 4, "missing keys: fc2.bias"),
    ("info-unexpected-key", ["info", P % "unexpected.pt", *A], 4, "unexpected keys: extra.w"),
    ("info-misshaped-key", ["info", P % "misshaped.pt", *A], 4, "mis-shaped keys: fc3.weight"),
    ("info-nan", ["info", P % "nan.pt", *A], 4, "NaN/Inf"),
    ("info-inf", ["info", P % "inf.pt", *A], 4, "NaN/Inf"),
    ("info-nothing", ["info"], 2, "PATH"),
    # --- untrusted input
    ("info-evil-pt", ["info", P % "evil.pt", *A], 5, "--trust-pickle"),
    ("info-module-pt", ["info", P % "module.pt"], 5, "--trust-pickle"),
    ("info-raw-pickle", ["info", P % "raw.pkl", *A], 5, "--trust-pickle"),
    ("info-import-in-manifest", ["info", P % "m-importarch"], 5, "import path"),
    ("info-symlink-escape", ["info", P % "escape"], 5, "outside"),
    # --- manifests
    ("info-manifest-types", ["info", P % "m-badtype"], 4, "history"),
    ("info-manifest-version", ["info", P % "m-future"], 4, "schema version 99"),
    ("info-manifest-noarch", ["info", P % "m-noarch"], 4, "arch"),
    # --- decompose
    ("dec-rank-0", ["decompose", M, *A, "-o", "{out}", "--rank", "0"], 2, "--rank"),
    ("dec-rank-neg", ["decompose", M, *A, "-o", "{out}", "--rank", "fc1=-2"], 2, "positive"),
    ("dec-rank-text", ["decompose", M, *A, "-o", "{out}", "--rank", "big"], 2, "--rank"),
    ("dec-threads", ["decompose", M, *A, "-o", "{out}", "--threads", "0"], 2, "--threads"),
    ("export-threads", ["export", M, *A, "-o", "{out}", "--threads", "0"], 2, "--threads"),
    ("dec-rank-huge", ["decompose", M, *A, "-o", "{out}", "--rank", "9999", "--modes", "2"], 4, "full rank"),
    ("dec-format", ["decompose", M, *A, "-o", "{out}", "--format", "cp"], 2, "--format"),
    ("dec-modes", ["decompose", M, *A, "-o", "{out}", "--modes", "many"], 2, "--modes"),
    ("dec-modes-factor", ["decompose", M, *A, "-o", "{out}", "--modes", "fc1=27x28:15x20"], 4,
     "does not factor"),
    ("dec-compression", ["decompose", M, *A, "-o", "{out}", "--compression", "0.5"], 2, "--compression"),
    ("dec-rank-and-compr", ["decompose", M, *A, "-o", "{out}", "--rank", "4", "--compression", "9"], 2,
     "either"),
    ("dec-include-bn", ["decompose", M, *A, "-o", "{out}", "--include", "nothing*"], 4, "no layer"),
    ("dec-init", ["decompose", M, *A, "-o", "{out}", "--init", "zeros"], 2, "--init"),
    ("dec-chain", ["decompose", M, *A, "-o", "{out}", "--chain", "curly"], 2, "--chain"),
    ("dec-twice", ["decompose", P % "dec", "-o", "{out}"], 4, "already"),
    ("dec-exists", ["decompose", M, *A, "-o", P % "exists"], 6, "--overwrite"),
    ("dec-under-file", ["decompose", M, *A, "-o", "{f:afile}/x"], 6, "not a directory"),
    ("dec-readonly", ["decompose", M, *A, "-o", "{f:readonly}/x"], 6, "not writable"),
    ("dec-unwritable-fs", ["decompose", M, *A, "-o", "/proc/tedepr-out/x"], 6, "cannot"),
    # --- prune
    ("prune-s0", ["prune", M, *A, "-o", "{out}", "--sparsity", "0"], 2, "(0, 1)"),
    ("prune-s1", ["prune", M, *A, "-o", "{out}", "--sparsity", "1"], 2, "(0, 1)"),
    ("prune-sneg", ["prune", M, *A, "-o", "{out}", "--sparsity", "-0.2"], 2, "(0, 1)"),
    ("prune-s-big", ["prune", M, *A, "-o", "{out}", "--sparsity", "1.5"], 2, "(0, 1)"),
    ("prune-s-text", ["prune", M, *A, "-o", "{out}", "--sparsity", "lots"], 2, ""),
    ("prune-none", ["prune", M, *A, "-o", "{out}"], 2, "--sparsity"),
    ("prune-both", ["prune", M, *A, "-o", "{out}", "--sparsity", ".9", "--density", ".1"], 2, "one of"),
    ("prune-criterion", ["prune", M, *A, "-o", "{out}", "--sparsity", ".99", "--criterion", "oracle"], 2,
     "unknown criterion"),
    ("prune-needs-data", ["prune", M, *A, "-o", "{out}", "--sparsity", ".99", "--criterion", "grasp"], 2,
     "--data"),
    ("prune-scope", ["prune", M, *A, "-o", "{out}", "--sparsity", ".99", "--scope", "row"], 2, "--scope"),
    ("prune-threads", ["prune", M, *A, "-o", "{out}", "--sparsity", ".99", "--threads", "0"], 2, "threads"),
    ("prune-min-density", ["prune", M, *A, "-o", "{out}", "--sparsity", ".99", "--min-density", "2"], 2,
     "--min-density"),
    ("prune-data-missing", ["prune", M, *A, "-o", "{out}", "--sparsity", ".99", "--data", "{f:dir}/x.npz"],
     3, "does not exist"),
    ("prune-data-shape", ["prune", M, *A, "-o", "{out}", "--sparsity", ".99", "--data", P % "shape.npz"], 4,
     "features"),
    ("prune-data-labels", ["prune", M, *A, "-o", "{out}", "--sparsity", ".99", "--data", P % "labels.npz"],
     4, "out of range"),
    ("prune-data-float-labels", ["prune", M, *A, "-o", "{out}", "--sparsity", ".99", "--data",
                                 P % "float_labels.npz"], 4, "integer"),
    ("prune-data-empty", ["prune", M, *A, "-o", "{out}", "--sparsity", ".99", "--data", P % "empty.npz"], 4,
     "no samples"),
    ("prune-data-keys", ["prune", M, *A, "-o", "{out}", "--sparsity", ".99", "--data", P % "nodata.npz"], 4,
     ""),
    ("prune-data-dtype", ["prune", M, *A, "-o", "{out}", "--sparsity", ".99", "--data", P % "strings.npz"],
     4, ""),
    ("prune-data-negative", ["prune", M, *A, "-o", "{out}", "--sparsity", ".99", "--data",
                             P % "negative.npz"], 4, ">= 0"),
    ("prune-twice", ["prune", P % "pruned", "-o", "{out}", "--sparsity", ".999"], 4, "already pruned"),
    ("prune-guard", ["prune", M, *A, "-o", "{out}", "--sparsity", ".999", "--no-decompose",
                     "--criterion", "magnitude", "--min-density", "0.01"], 7, "guard"),
    ("prune-collapse", ["prune", P % "init.pt", *A, "-o", "{out}", "--sparsity", ".99", "--no-decompose",
                        "--criterion", "magnitude", "--no-path-guard"], 7, "collapse"),
    ("prune-exists", ["prune", M, *A, "-o", P % "exists", "--sparsity", ".99"], 6, "--overwrite"),
    # --- finetune / eval
    ("ft-epochs", ["finetune", P % "pruned", "--data", D, "-o", "{out}", "--epochs", "0"], 2, "--epochs"),
    ("ft-lr", ["finetune", P % "pruned", "--data", D, "-o", "{out}", "--lr", "-1"], 2, "--lr"),
    ("ft-optimizer", ["finetune", P % "pruned", "--data", D, "-o", "{out}", "--optimizer", "lion"], 2,
     "--optimizer"),
    ("ft-schedule", ["finetune", P % "pruned", "--data", D, "-o", "{out}", "--schedule", "wavy"], 2,
     "--schedule"),
    ("ft-val", ["finetune", P % "pruned", "--data", D, "-o", "{out}", "--val-fraction", "1"], 2,
     "--val-fraction"),
    ("ft-exists", ["finetune", P % "pruned", "--data", D, "-o", P % "exists"], 6, "--overwrite"),
    ("ft-resume-overwrite", ["finetune", P % "pruned", "--data", D, "-o", "{out}", "--resume",
                             "--overwrite"], 2, "--resume"),
    ("ft-resume-foreign", ["finetune", P % "pruned", "--data", D, "-o", "{f:dir}", "--resume"], 4,
     "not a tedepr finetune run"),
    ("ft-cuda", ["finetune", P % "pruned", "--data", D, "-o", "{out}", "--device", "cuda"], 10, "CUDA"),
    ("ft-data-labels", ["finetune", P % "pruned", "--data", P % "labels.npz", "-o", "{out}"], 4,
     "out of range"),
    ("ft-data-missing", ["finetune", P % "pruned", "--data", "{f:dir}/none.npz", "-o", "{out}"], 3, ""),
    ("eval-batch", ["eval", M, *A, "--data", D, "--batch-size", "0"], 2, "batch"),
    ("eval-split", ["eval", M, *A, "--data", D, "--split", "dev"], 2, "split"),
    ("eval-data-shape", ["eval", M, *A, "--data", P % "shape.npz"], 4, ""),
    # --- export / validate
    ("exp-opset", ["export", P % "pruned", "-o", "{out}", "--opset", "7"], 2, "--opset"),
    ("exp-format", ["export", P % "pruned", "-o", "{out}", "--to", "coreml"], 2, "--to"),
    ("exp-batches", ["export", P % "pruned", "-o", "{out}", "--batch-sizes", "a"], 2, "--batch-sizes"),
    ("exp-tol", ["export", P % "pruned", "-o", "{out}", "--atol", "-1"], 2, "--atol"),
    ("exp-exists", ["export", P % "pruned", "-o", P % "exists"], 6, "--overwrite"),
    ("val-not-dir", ["validate", "{f:dir}/none"], 3, "not a directory"),
    ("val-no-samples", ["validate", P % "exists"], 4, "sample_inputs"),
    ("val-empty-onnx", ["validate", P % "onnx-empty"], 4, "not a loadable ONNX"),
    ("val-truncated-onnx", ["validate", P % "onnx-trunc"], 4, "not a loadable ONNX"),
    # --- bench
    ("bench-engine", ["bench", P % "pruned", "--engines", "gpu9000"], 2, "engine"),
    ("bench-batch", ["bench", P % "pruned", "--batch", "0"], 2, "--batch"),
    ("bench-iters", ["bench", P % "pruned", "--iters", "0"], 2, "--iters"),
    ("bench-baseline-missing", ["bench", P % "pruned", "--baseline", "{f:dir}/none.pt"], 3, ""),
    ("bench-baseline-bad", ["bench", P % "pruned", "--baseline", P % "garbage.pt"], 4, ""),
    ("bench-compare-alone", ["bench", P % "pruned", "--compare-to", P % "garbage.pt"], 2, "--compare-to"),
    ("bench-cuda", ["bench", P % "pruned", "--device", "cuda", "--iters", "1"], 10, "CUDA"),
    ("bench-target-missing", ["bench", "{f:dir}/none"], 3, ""),
]


def _expand(arg, fx, out):
    if arg == "{out}":
        return str(out)
    for name, path in fx.items():
        arg = arg.replace(f"{{f:{name}}}", str(path))
    return arg


def test_there_are_at_least_60_cases():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)
    assert {c[2] for c in CASES} <= set(EXIT_CODES)


@pytest.mark.parametrize("name,argv,code,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input(fx, tmp_path, name, argv, code, fragment):
    out = tmp_path / "out"
    before = sorted(p.name for p in fx["dir"].iterdir())
    if name == "dec-readonly" and os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    r = run_cli(*[_expand(a, fx, out) for a in argv])
    assert r.exit_code == code, (r.exit_code, r.stdout[-500:], r.stderr[-1500:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("tedepr: ") and
             ("error" in ln or "refused" in ln or "not found" in ln or "bad input" in ln
              or "collapse" in ln or "unavailable" in ln or "failed" in ln)]
    assert len(lines) == 1, r.stderr  # Click's usage errors too: one line, not its usage box
    assert fragment.lower() in r.stderr.lower(), r.stderr
    assert not out.exists()
    assert sorted(p.name for p in fx["dir"].iterdir()) == before  # nothing new beside inputs
    assert not fx["pwned"].exists()  # no pickle payload ever ran


def test_full_disk_leaves_nothing(tmp_path, monkeypatch):
    import tedepr_cli.artifact as A_

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(A_, "save_file", full)
    r = run_cli("decompose", M, *A, "-o", tmp_path / "o")
    assert r.exit_code == 6 and "no space left" in r.stderr.lower()
    assert list(tmp_path.iterdir()) == []


def test_permission_denied_mid_write_leaves_nothing(tmp_path, monkeypatch):
    """Refused writes that the up-front check cannot see (read-only mounts, ACLs; and the
    read-only-directory case above, which root bypasses) are exit 6 too, with no leftovers."""
    import tedepr_cli.artifact as A_

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(A_, "save_file", denied)
    r = run_cli("decompose", M, *A, "-o", tmp_path / "o")
    assert r.exit_code == 6 and "permission denied" in r.stderr.lower()
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_mid_write_leaves_nothing(tmp_path, monkeypatch):
    import tedepr_cli.artifact as A_

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(A_, "save_file", interrupted)
    r = run_cli("prune", M, *A, "--sparsity", "0.99", "-o", tmp_path / "o")
    assert r.exit_code == 130 and "interrupted" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_nan_loss_exit_code(tmp_path, fx):
    r = run_cli("finetune", fx["pruned"], "--data", D, "-o", tmp_path / "r", "--lr", "1e30",
                "--optimizer", "sgd", "--epochs", "2", "--limit-train", "256")
    assert r.exit_code == 9 and "NaN" in r.stderr


def test_kernels_check_without_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("TEDEPR_CC", "/nonexistent/cc")
    monkeypatch.setenv("TEDEPR_CACHE_DIR", str(tmp_path))
    from tedepr_cli.kernels import build

    build.reset()
    try:
        r = run_cli("kernels", "--check")
        assert r.exit_code == 10, r.stdout + r.stderr
    finally:
        monkeypatch.undo()
        build.reset()
