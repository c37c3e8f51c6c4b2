"""``benchmarks/gpu_check.sh``: its CPU smoke run does every step of the GPU check at toy
size (Triton interpreted) and writes the report; a Python missing packages is told which
wheels to carry; the report fails on any problem the check can find."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv

import pytest

from .conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["env", "tests", "prune-sample", "models", "finetune", "masks", "bench-lenet300", "bench-resnet20",
         "bench-vgg11"]

pytest.importorskip("triton")


def _run(*args, timeout=600, **env):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **env})


def _root_entries():
    return sorted(p.name for p in ROOT.iterdir())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    before = _root_entries()
    r = _run("--cpu-smoke", "--out", out, "--python", sys.executable, "--budget", "500",
             TEDEPR_CACHE_DIR=str(out / "unused"))
    assert _root_entries() == before  # nothing written into the repository
    return r, out


def test_cpu_smoke_runs_every_step_and_reports(smoke):
    r, out = smoke
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if p.name != "unused") == [
        "bench-lenet300.json", "bench-resnet20.json", "bench-vgg11.json", "gpu_check.json", "gpu_check.log",
        "gpu_check.md"]
    s = json.loads((out / "gpu_check.json").read_text())
    assert s["ok"] and not s["problems"]
    assert sorted(st["step"] for st in s["steps"]) == sorted(STEPS)
    assert all(st["rc"] == 0 for st in s["steps"])
    assert [(row["family"], row["batch"]) for row in s["rows"]] == [
        (f, b) for f in ("lenet300", "resnet20", "vgg11") for b in (1, 2)]
    for row in s["rows"]:
        assert row["dense_torch_us"] > 0 and row["triton_us"] > 0 and row["triton_max_rel_error"] <= 1e-4
    assert s["finetune"]["epochs_run"] == 2 and s["finetune"]["masks"]["ok"]
    assert s["finetune"]["masks"]["pruned_but_nonzero"] == 0 and s["finetune"]["masks"]["pruned_entries"] > 0
    assert s["tests"]["passed"] >= 1 and not s["tests"]["failed"]
    md = (out / "gpu_check.md").read_text()
    assert "GPU check: passed" in md and "| vgg11 | 2 |" in md


def test_report_fails_on_each_problem(smoke, tmp_path):
    """A Triton error above 1e-4, a missing model, a failed step, masks that moved: each
    makes the report fail and say why."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    _, out = smoke
    good = json.loads((out / "gpu_check.json").read_text())

    def work(edit):
        w = tmp_path / f"w{len(list(tmp_path.iterdir()))}"
        w.mkdir()
        for f in out.glob("bench-*.json"):
            shutil.copy(f, w)
        (w / "env.json").write_text(json.dumps(good["env"]))
        (w / "steps.jsonl").write_text("".join(json.dumps(st) + "\n" for st in good["steps"]))
        (w / "finetune.json").write_text(json.dumps({"epochs_run": 2, "test_accuracy": 0.5, "epochs": []}))
        (w / "masks.json").write_text(json.dumps(good["finetune"]["masks"]))
        (w / "pytest.xml").write_text('<testsuites><testsuite tests="1" failures="0" errors="0" skipped="0">'
                                      '<testcase classname="t" name="x"/></testsuite></testsuites>')
        edit(w)
        return gpu_check.summarize(w)

    assert work(lambda w: None)["ok"]

    def worse_error(w):
        d = json.loads((w / "bench-resnet20.json").read_text())
        d["triton"]["max_rel_error"]["2"] = 3e-4
        (w / "bench-resnet20.json").write_text(json.dumps(d))

    s = work(worse_error)
    assert not s["ok"] and any("relative error" in p for p in s["problems"])
    s = work(lambda w: (w / "bench-vgg11.json").unlink())
    assert not s["ok"] and any("vgg11" in p for p in s["problems"])
    s = work(lambda w: (w / "steps.jsonl").open("a").write(json.dumps({"step": "bench-x", "rc": 124,
                                                                        "seconds": 80}) + "\n"))
    assert not s["ok"] and any("bench-x exited 124" in p for p in s["problems"])
    s = work(lambda w: (w / "masks.json").write_text(json.dumps({"ok": False, "pruned_but_nonzero": 3})))
    assert not s["ok"] and any("masked entry" in p for p in s["problems"])
    failed = ('<testsuite tests="2" failures="1" errors="0" skipped="0">'
              '<testcase classname="t" name="y"><failure/></testcase></testsuite>')
    s = work(lambda w: (w / "pytest.xml").write_text(failed))
    assert not s["ok"] and s["tests"]["failed"] == ["t::y"]


def test_a_python_without_the_packages_is_told_which_wheels_to_carry(tmp_path):
    """The device reaches no registry: a missing package stops the check at once (exit 3)
    with the `pip download` command for that Python; nothing is installed from nowhere."""
    env_dir = tmp_path / "bare"
    venv.create(env_dir, with_pip=False)  # a Python with nothing installed
    py = env_dir / "bin" / "python"
    out = tmp_path / "out"
    r = _run("--out", out, "--python", py, "--wheels", tmp_path / "no-wheels", timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert "pip download" in r.stderr and f"--python-version {ver}" in r.stderr and "-d .whl" in r.stderr
    for name in ("torch", "triton", "tensorly", "onnxruntime"):
        assert name in r.stderr
    s = json.loads((out / "gpu_check.json").read_text())
    assert not s["ok"] and s["steps"] == [{"step": "env", "rc": 3, "seconds": s["steps"][0]["seconds"],
                                           "cap": None}]


def test_masks_check_fails_when_a_pruned_entry_moved(tmp_path):
    """`gpu_check.py masks RUN` is what says the CUDA fine-tune kept the masks: it reads the
    raw trained weights (the run's state.pt) and must fail when a pruned entry is not
    exactly zero there."""
    import torch

    from tedepr_cli.arch import parse_arch
    from tedepr_cli.artifact import save_artifact
    from tedepr_cli.loading import load_model
    from tedepr_cli.masks import plain_state_dict
    from tedepr_cli.pruning.prune import PruneOptions, prune

    from .conftest import LENET300

    art, _ = prune(load_model(LENET300, parse_arch("lenet300")), PruneOptions(sparsity=0.995,
                                                                              criterion="magnitude"))
    name, mask = next(iter(art.masks.items()))
    check = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "masks"]
    for run, moved in (("good", False), ("bad", True)):
        save_artifact(art, tmp_path / run / "last")
        state = {k: v.clone() for k, v in plain_state_dict(art.model).items()}
        if moved:
            state[name][~mask] = 1e-3
        torch.save({"model": state}, tmp_path / run / "state.pt")
        r = subprocess.run([*check, tmp_path / run], capture_output=True, text=True, cwd=ROOT)
        d = json.loads(r.stdout)
        assert (r.returncode, d["ok"]) == ((1, False) if moved else (0, True)), r.stderr
        assert d["pruned_but_nonzero"] == (int((~mask).sum()) if moved else 0)
