"""Masked fine-tuning: zeros stay zero, exact resume, DDP equivalence, eval, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tedepr_cli.arch import parse_arch
from tedepr_cli.artifact import load_artifact
from tedepr_cli.errors import TrainingDiverged, UsageError
from tedepr_cli.loading import load_model
from tedepr_cli.masks import plain_named_parameters
from tedepr_cli.pruning.prune import PruneOptions, prune
from tedepr_cli.train import TrainOptions, finetune

from .conftest import LENET300, MNIST, ROOT, ZOO_CASES, run_cli


@pytest.fixture(scope="module")
def pruned():
    art = load_model(LENET300, parse_arch("lenet300"))
    out, _ = prune(art, PruneOptions(sparsity=0.995, criterion="snip"), MNIST)
    return out


def _quick(**kw):
    base = dict(epochs=2, batch_size=64, limit_train=512, lr=3e-3, seed=5)
    base.update(kw)
    return TrainOptions(**base)


def _weights(art):
    return {k: v.clone() for k, v in art.model.state_dict().items()}


@pytest.mark.parametrize("optimizer,wd,path", [("adamw", 0.01, "chain"), ("sgd", 5e-4, "chain"),
                                               ("adam", 0.0, "chain"), ("adamw", 0.01, "dense")])
def test_pruned_entries_stay_exactly_zero(pruned, tmp_path, optimizer, wd, path, monkeypatch):
    import tedepr_cli.train as train_mod

    live = []  # the model being trained, checked in memory at every epoch end (before any save,
    # whose compact storage would re-zero pruned entries and hide a broken mask mechanism)
    snapshot = train_mod._artifact

    def spy(src, model, *args, **kwargs):
        stored = plain_named_parameters(model)
        live.append(all(torch.count_nonzero(stored[n].detach()[~m.to(stored[n].device)]) == 0
                        for n, m in pruned.masks.items()))
        return snapshot(src, model, *args, **kwargs)

    monkeypatch.setattr(train_mod, "_artifact", spy)
    best, summary = finetune(pruned, MNIST, tmp_path / "run", _quick(optimizer=optimizer, weight_decay=wd,
                                                                    lr=0.05 if optimizer == "sgd" else 3e-3,
                                                                    train_path=path))
    assert live and all(live)
    params = plain_named_parameters(best.model)
    for n, m in pruned.masks.items():
        assert torch.equal(best.masks[n], m)
        assert torch.count_nonzero(params[n].detach()[~m]) == 0  # bit for bit zero
        assert torch.count_nonzero(params[n].detach()[m]) > 0
    before = plain_named_parameters(pruned.model)
    assert any(not torch.equal(params[n], before[n]) for n in pruned.masks)  # it did train
    assert summary["epochs_run"] == 2 and 0 <= summary["test_accuracy"] <= 1
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    for which in ("best", "last"):
        a = load_artifact(tmp_path / "run" / which)
        assert a.meta["training"]["recipe"]["optimizer"] == optimizer
        assert a.history[-1]["command"] == "finetune"


def test_resume_after_interrupt_is_exact(pruned, tmp_path):
    straight, _ = finetune(pruned, MNIST, tmp_path / "a", _quick(epochs=4))

    def stop(epoch, metrics):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(pruned, MNIST, tmp_path / "b", _quick(epochs=4), on_epoch=stop)
    assert json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 2
    finetune(pruned, MNIST, tmp_path / "b", TrainOptions(), resume=True)  # recipe comes from the run
    a, b = load_artifact(tmp_path / "a" / "last"), load_artifact(tmp_path / "b" / "last")
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    for name in ("metrics.jsonl", "last/model.safetensors", "best/model.safetensors"):  # no durations stored
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_nan_loss_stops_and_keeps_last_good_checkpoint(pruned, tmp_path, monkeypatch):
    import tedepr_cli.train as T

    real = T.F.cross_entropy
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] > 8 else out  # 8 steps = epoch 1

    monkeypatch.setattr(T.F, "cross_entropy", flaky)
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        finetune(pruned, MNIST, tmp_path / "r", _quick(epochs=3))
    last = load_artifact(tmp_path / "r" / "last")
    assert last.meta["training"]["epoch"] == 1
    assert all(torch.isfinite(p).all() for p in last.model.parameters())


@pytest.mark.parametrize("name", sorted(ZOO_CASES))
def test_every_zoo_family_finetunes_through_the_cli(name, tmp_path):
    ck = tmp_path / "m.pt"
    from tedepr_cli.zoo import MODELS

    torch.manual_seed(0)
    torch.save(MODELS.get(name)(**ZOO_CASES[name]).state_dict(), ck)
    kw = json.dumps(ZOO_CASES[name])
    r = run_cli("prune", ck, "--arch", name, "--arch-kwargs", kw, "--sparsity", "0.99",
                "--criterion", "magnitude", "-o", tmp_path / "p")
    assert r.exit_code == 0, r.stderr
    r = run_cli("finetune", tmp_path / "p", "--data", MNIST, "-o", tmp_path / "ft", "--epochs", "1",
                "--limit-train", "64", "--batch-size", "32", "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["epochs_run"] == 1 and 0 <= d["test_accuracy"] <= 1
    r = run_cli("eval", tmp_path / "ft", "--data", MNIST, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["accuracy"] == pytest.approx(d["test_accuracy"])


def test_eval_reports_per_class_accuracy():
    r = run_cli("eval", LENET300, "--arch", "lenet300", "--data", MNIST, "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["correct"] == json.loads((ROOT / "samples" / "lenet300.json").read_text())["correct"]
    assert set(d["per_class_accuracy"]) == {str(c) for c in range(10)} and d["examples_per_s"] > 0
    r = run_cli("eval", LENET300, "--arch", "lenet300", "--data", MNIST)
    assert "per-class accuracy" in r.stdout


def test_eval_gives_every_accuracy_in_the_same_unit():
    """The human output gave the overall accuracy in percent and the per-class table in
    fractions (0.98 next to 94.00 %): percent everywhere now; --json keeps fractions in
    [0, 1] for both, as metrics.jsonl and the finetune summary do."""
    import re

    d = json.loads(run_cli("eval", LENET300, "--arch", "lenet300", "--data", MNIST, "--json").stdout)
    assert 0 < d["accuracy"] <= 1 and all(0 <= a <= 1 for a in d["per_class_accuracy"].values())
    r = run_cli("eval", LENET300, "--arch", "lenet300", "--data", MNIST)
    assert r.exit_code == 0, r.stderr
    assert f"accuracy {100 * d['accuracy']:.2f} %" in r.stdout
    rows = dict(re.findall(r"^\W*(\d+)\W+([\d.]+ %)", r.stdout, flags=re.M))
    assert rows == {c: f"{100 * a:.2f} %" for c, a in d["per_class_accuracy"].items()}, r.stdout


def test_cli_bad_input(pruned, tmp_path):
    from tedepr_cli.artifact import save_artifact

    art = save_artifact(pruned, tmp_path / "p")
    (tmp_path / "exists").mkdir()
    r = run_cli("finetune", art, "--data", MNIST, "-o", tmp_path / "exists")
    assert r.exit_code == 6
    r = run_cli("finetune", art, "--data", MNIST, "-o", tmp_path / "x", "--lr", "-1")
    assert r.exit_code == 2 and not (tmp_path / "x").exists()
    r = run_cli("finetune", art, "--data", MNIST, "-o", tmp_path / "x", "--device", "cuda")
    assert r.exit_code == (10 if not torch.cuda.is_available() else 0)
    import numpy as np

    np.savez(tmp_path / "bad.npz", x=np.zeros((20, 28, 28), np.uint8), y=np.full(20, 12))
    r = run_cli("finetune", art, "--data", tmp_path / "bad.npz", "-o", tmp_path / "y")
    assert r.exit_code == 4 and "out of range" in r.stderr and not (tmp_path / "y").exists()
    r = run_cli("finetune", art, "--data", MNIST, "-o", tmp_path / "z", "--resume", "--overwrite")
    assert r.exit_code == 2


def test_finetune_trains_on_its_threads_and_restores_the_count(pruned, tmp_path):
    """The library set PyTorch's process-wide thread count to opts.threads and left it
    there; it now holds only while it trains."""
    before = torch.get_num_threads()
    seen = []
    finetune(pruned, MNIST, tmp_path / "run", _quick(epochs=1, limit_train=64, threads=before + 1),
             on_epoch=lambda e, m: seen.append(torch.get_num_threads()))
    assert seen == [before + 1] and torch.get_num_threads() == before


def test_resume_refuses_options_that_differ_from_the_recorded_recipe(pruned, tmp_path):
    """--resume used to ignore every option given with it in silence: those that would
    change what the remaining epochs compute (and the data) are refused, each named with
    its recorded and given value, and the run is left untouched."""
    import shutil

    from tedepr_cli.artifact import save_artifact

    art = save_artifact(pruned, tmp_path / "p")
    run = tmp_path / "run"
    finetune(load_artifact(art), MNIST, run, _quick(epochs=1, limit_train=128))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    r = run_cli("finetune", art, "--data", MNIST, "-o", run, "--resume", "--lr", "0.5", "--batch-size", "7",
                "--epochs", "3")
    assert r.exit_code == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tedepr: usage error: "), r.stderr
    assert "--lr recorded 0.003, given 0.5" in err[0] and "--batch-size recorded 64, given 7" in err[0]
    assert "--epochs" not in err[0]  # more epochs is a change a resume may make
    other = tmp_path / "other.npz"
    shutil.copy(MNIST, other)
    r = run_cli("finetune", art, "--data", other, "-o", run, "--resume", "--seed", "5")  # same seed: fine
    assert r.exit_code == 2
    assert f"--data recorded {Path(MNIST).resolve()}, given {other.resolve()}" in r.stderr
    assert "--seed" not in r.stderr
    with pytest.raises(UsageError, match="label_smoothing recorded 0, given 0.1"):  # the library: opts set
        finetune(load_artifact(art), MNIST, run, TrainOptions(label_smoothing=0.1), resume=True)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_resume_of_a_missing_run_warns_that_it_starts_a_new_one(pruned, tmp_path, caplog):
    """--resume on a path that does not exist starts a run there (resume-or-start), but says
    so as a warning: a typo in -o must not train from scratch unnoticed."""
    import logging

    from tedepr_cli.artifact import save_artifact

    art = save_artifact(pruned, tmp_path / "p")
    with caplog.at_level(logging.INFO, logger="tedepr"):
        finetune(load_artifact(art), MNIST, tmp_path / "typo", _quick(epochs=1, limit_train=64), resume=True)
    warned = [r for r in caplog.records
              if r.levelno >= logging.WARNING and "no run to resume" in r.getMessage()]
    assert len(warned) == 1 and (tmp_path / "typo" / "best").is_dir()


def test_resume_with_more_epochs_runs_them(pruned, tmp_path):
    """--epochs on --resume extends the run (it was ignored): with a constant schedule, one
    epoch resumed to three ends bit-identical to a straight three-epoch run; fewer epochs
    than the run completed is refused."""
    from tedepr_cli.artifact import save_artifact

    art = save_artifact(pruned, tmp_path / "p")
    quick = dict(limit_train=128, schedule="constant")
    finetune(load_artifact(art), MNIST, tmp_path / "a", _quick(epochs=3, **quick))
    finetune(load_artifact(art), MNIST, tmp_path / "b", _quick(epochs=1, **quick))
    r = run_cli("finetune", art, "--data", MNIST, "-o", tmp_path / "b", "--resume", "--epochs", "3",
                "--threads", "1")
    assert r.exit_code == 0, r.stderr
    assert "--epochs 1 -> 3" in r.stderr and "epoch 3/3" in r.stderr, r.stderr
    for name in ("metrics.jsonl", "last/model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # best/ may be an epoch written before the extension (its manifest keeps that recipe)
    a, b = load_artifact(tmp_path / "a" / "best"), load_artifact(tmp_path / "b" / "best")
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    r = run_cli("finetune", art, "--data", MNIST, "-o", tmp_path / "b", "--resume", "--epochs", "2")
    assert r.exit_code == 2 and "--epochs 2 is fewer than the 3 epochs" in r.stderr


DDP_SCRIPT = """
import json, sys, torch
from pathlib import Path
from tedepr_cli.artifact import load_artifact
from tedepr_cli.train import TrainOptions, finetune
art = load_artifact(sys.argv[1])
opts = TrainOptions(epochs=2, batch_size=64, limit_train=256, lr=3e-3, seed=2, val_fraction=0.1,
                    optimizer="sgd", train_path=sys.argv[4] if len(sys.argv) > 4 else "chain")
progress = []  # what the progress bar shows: (epoch, batch, loss)
_, summary = finetune(art, sys.argv[2], Path(sys.argv[3]), opts,
                      on_batch=lambda e, b, n, loss: progress.append([e, b, loss]))
rank = __import__("os").environ.get("RANK", "0")
Path(sys.argv[3] + f".paths{rank}.json").write_text(json.dumps(summary["train_paths"]))
if progress:  # only the main rank reports progress
    Path(sys.argv[3] + ".progress.json").write_text(json.dumps(progress))
"""


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_ddp_two_processes_match_single_process(pruned, tmp_path):
    """2 gloo ranks == 1 process: the weights, and every reported figure (metrics.jsonl, the
    progress value), which are sums over all ranks' shares of each global batch."""
    from tedepr_cli.artifact import save_artifact

    art = save_artifact(pruned, tmp_path / "p")
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    single = subprocess.run([sys.executable, str(script), str(art), str(MNIST), str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(29500 + os.getpid() % 1000)]
    multi = subprocess.run([*torchrun, str(script), str(art), str(MNIST), str(tmp_path / "two")],
                           env=env, capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    a, b = load_artifact(tmp_path / "one" / "last"), load_artifact(tmp_path / "two" / "last")
    for k, v in a.model.state_dict().items():
        assert torch.allclose(v, b.model.state_dict()[k], rtol=1e-4, atol=1e-6), k
    for n, m in a.masks.items():  # masks survive DDP
        assert torch.equal(b.masks[n], m) and not plain_named_parameters(b.model)[n][~m].any()
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert len(one) == len(two) == 2
    for m1, m2 in zip(one, two, strict=True):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
            assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), (m1["epoch"], key, m1[key], m2[key])
    p1, p2 = (json.loads((tmp_path / f"{n}.progress.json").read_text()) for n in ("one", "two"))
    assert len(p1) == len(p2) == 2 * 4  # --limit-train 256 (after the validation share) / batch 64
    for (e1, b1, l1), (e2, b2, l2) in zip(p1, p2, strict=True):
        assert (e1, b1) == (e2, b2) and l2 == pytest.approx(l1, rel=1e-5), (e1, b1, l1, l2)


def test_ddp_with_a_measured_train_path_shares_rank_0s_choice(pruned, tmp_path):
    """--train-path auto under DDP: rank 0 measures, every rank receives its choice (a
    broadcast every rank must join: a rank that measured on its own or skipped it would
    hang or fail the run), and the run records it."""
    from tedepr_cli.artifact import save_artifact

    art = save_artifact(pruned, tmp_path / "p")
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(30500 + os.getpid() % 1000)]
    multi = subprocess.run([*torchrun, str(script), str(art), str(MNIST), str(tmp_path / "two"), "auto"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    state = torch.load(tmp_path / "two" / "state.pt", weights_only=True)
    assert set(state["train_paths"]) == {"fc1", "fc2", "fc3"}
    assert set(state["train_paths"].values()) <= {"chain", "dense", "kernel"}
    seen = [json.loads((tmp_path / f"two.paths{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] == seen[1] and {n: t["path"] for n, t in seen[0].items()} == state["train_paths"]


# ---------------------------------------------------------------------------- distillation
def test_distill_loss_is_temperature_scaled_kl():
    from tedepr_cli.distill import distill_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randn(6, 10, generator=g,
                                                                            dtype=torch.float64)
    ref = torch.nn.functional.kl_div(torch.log_softmax(s / 3, -1), torch.log_softmax(t / 3, -1),
                                     reduction="none", log_target=True).sum(-1) * 9
    assert torch.allclose(distill_loss(s, t, 3.0), ref)
    assert torch.allclose(distill_loss(t, t, 3.0), torch.zeros(6, dtype=torch.float64))


def test_teacher_alpha_zero_changes_nothing_and_alpha_one_does(pruned, tmp_path):
    """The dense original teaches through its soft targets only: alpha 0 trains bit-identically
    to no teacher (the plumbing adds nothing), alpha 1 trains on the teacher alone."""
    plain, _ = finetune(pruned, MNIST, tmp_path / "plain", _quick())
    zero, _ = finetune(pruned, MNIST, tmp_path / "zero", _quick(teacher=str(LENET300), distill_alpha=0.0))
    one, _ = finetune(pruned, MNIST, tmp_path / "one", _quick(teacher=str(LENET300), distill_alpha=1.0))
    for k, v in _weights(plain).items():
        assert torch.equal(v, _weights(zero)[k]), k
    assert any(not torch.equal(v, _weights(one)[k]) for k, v in _weights(plain).items())
    recipe = load_artifact(tmp_path / "one" / "best").meta["training"]["recipe"]
    assert recipe["teacher"] == str(LENET300) and recipe["distill_alpha"] == 1.0


def test_teacher_bad_input(pruned, tmp_path):
    from tedepr_cli.zoo import MODELS

    art_dir = tmp_path / "p"
    from tedepr_cli.artifact import save_artifact

    save_artifact(pruned, art_dir)
    wrong = tmp_path / "wrong.pt"
    torch.save(MODELS.get("lenet300")(num_classes=7).state_dict(), wrong)
    base = ["finetune", art_dir, "--data", MNIST, "--epochs", "1", "--limit-train", "64"]
    r = run_cli(*base, "-o", tmp_path / "o1", "--teacher", tmp_path / "missing.pt")
    assert r.exit_code == 3 and not (tmp_path / "o1").exists()
    r = run_cli(*base, "-o", tmp_path / "o2", "--teacher", wrong)
    assert r.exit_code == 4 and "does not fit" in r.stderr and not (tmp_path / "o2").exists()
    r = run_cli(*base, "-o", tmp_path / "o3", "--teacher", LENET300, "--distill-alpha", "1.5")
    assert r.exit_code == 2 and not (tmp_path / "o3").exists()
    from tedepr_cli.arch import ArchSpec
    from tedepr_cli.artifact import Artifact

    seven = tmp_path / "seven"  # an artifact may be any network, but it must predict the same classes
    save_artifact(Artifact(model=MODELS.get("lenet300")(num_classes=7),
                           arch=ArchSpec("lenet300", {"num_classes": 7})), seven)
    r = run_cli(*base, "-o", tmp_path / "o4", "--teacher", seven)
    assert r.exit_code == 4 and "predicts 7 classes, the student 10" in r.stderr
    assert not (tmp_path / "o4").exists()


def test_a_resumed_run_shows_its_own_epoch_total(pruned, tmp_path):
    """--resume goes on with the saved recipe: the epoch lines count to the run's epochs,
    not the CLI default (they showed '/10' on a 3-epoch run), and it says so."""
    from tedepr_cli.artifact import save_artifact

    art = save_artifact(pruned, tmp_path / "p")

    class Stop(Exception):
        pass

    def stop(epoch, metrics):
        raise Stop

    with pytest.raises(Stop):
        finetune(load_artifact(art), MNIST, tmp_path / "run", _quick(epochs=3, limit_train=128),
                 on_epoch=stop)
    r = run_cli("finetune", art, "--data", MNIST, "-o", tmp_path / "run", "--resume")
    assert r.exit_code == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("tedepr: epoch ") or ln.startswith("epoch ")]
    assert any("2/3" in ln for ln in lines) and not any("/10" in ln for ln in lines), r.stderr
    assert "of 3 with its saved recipe" in r.stderr
