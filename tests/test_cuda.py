"""``--device cuda`` end to end: ``finetune`` keeps the masks exactly zero, ``bench`` times
the GPU engines with CUDA events, ``export`` validates on the GPU. The GPU tests skip on a
machine without CUDA (``benchmarks/gpu_check.sh`` runs them on one); without a GPU every
command refuses ``--device cuda`` in one line with exit 10 before writing anything."""

from __future__ import annotations

import json

import pytest
import torch

from tedepr_cli.arch import parse_arch
from tedepr_cli.artifact import save_artifact
from tedepr_cli.loading import load_model
from tedepr_cli.masks import plain_named_parameters
from tedepr_cli.pruning.prune import PruneOptions, prune

from .conftest import LENET300, MNIST, run_cli

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    art, _ = prune(load_model(LENET300, parse_arch("lenet300")),
                   PruneOptions(sparsity=0.995, criterion="magnitude"))
    return save_artifact(art, tmp_path_factory.mktemp("cuda") / "pruned")


@pytest.mark.parametrize("command", [
    ["bench", "--iters", "1", "--no-memory"],
    ["finetune", "--data", str(MNIST), "--epochs", "1", "-o", "{out}"],
    ["export", "-o", "{out}"],
])
def test_device_cuda_without_a_gpu_is_refused_in_one_line(command, pruned, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    args = [a.replace("{out}", str(out)) for a in command]
    r = run_cli(args[0], pruned, *args[1:], "--device", "cuda")
    assert r.exit_code == 10, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("tedepr: ") and "no CUDA device" in r.stderr
    assert not out.exists()


@gpu
def test_finetune_on_cuda_keeps_pruned_entries_exactly_zero(pruned, tmp_path):
    from tedepr_cli.artifact import load_artifact
    from tedepr_cli.train import TrainOptions, finetune

    art = load_artifact(pruned)
    _, summary = finetune(art, MNIST, tmp_path / "run", TrainOptions(
        epochs=2, batch_size=64, limit_train=512, lr=3e-3, seed=5, device="cuda", weight_decay=0.01))
    # the raw trained tensors (an artifact stores only kept entries: zero where pruned regardless)
    trained = torch.load(tmp_path / "run" / "state.pt", weights_only=True)["model"]
    before = plain_named_parameters(art.model)
    for n, m in art.masks.items():
        assert torch.count_nonzero(trained[n][~m]) == 0
        assert torch.count_nonzero(trained[n][m]) > 0
    assert any(not torch.equal(trained[n], before[n].detach()) for n in art.masks)  # it trained
    assert summary["epochs_run"] == 2 and 0 <= summary["test_accuracy"] <= 1


@gpu
def test_bench_on_cuda_times_the_gpu_engines(pruned):
    r = run_cli("bench", pruned, "--device", "cuda", "--json", "--iters", "5", "--warmup", "2",
                "--batch", "1,32")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["machine"]["gpu"]["name"] and d["memory"]["method"].startswith("torch.cuda")
    assert "tedepr" in d["skipped_engines"]  # the compiled kernels are a CPU engine
    for b in ("1", "32"):
        row = d["results"][b]
        assert {"dense-torch", "chain-torch", "triton"} <= set(row)
        for e in ("dense-torch", "chain-torch", "triton"):
            assert row[e]["median_s"] > 0 and row[e]["n"] == 5
            assert row[e]["peak_memory_bytes"] > 0
        for e in ("dense-torch-graph", "chain-torch-graph", "triton-graph"):  # on a GPU by default
            assert row[e]["median_s"] > 0 and row[e]["n"] == 5
        for e in ("dense-ort", "chain-ort"):  # timed on the CUDA provider, or skipped saying why
            assert e in row or "CUDAExecutionProvider" in d["skipped_engines"][e]
        assert d["triton"]["max_rel_error"][b] <= 1e-4
    assert d["triton"]["interpreted"] is False and d["gates"]["engine"] == "triton"


@gpu
def test_a_cuda_graph_replays_the_engine_exactly(pruned):
    """Each graph engine returns what its eager engine returns, and a replay really
    recomputes: its output buffer, wiped, is filled again."""
    from tedepr_cli.artifact import load_artifact
    from tedepr_cli.bench.engines import GRAPH_ENGINES, Engines, input_batch, load_baseline

    art = load_artifact(pruned)
    base, _ = load_baseline(art, None)
    eng = Engines(art, base, torch.device("cuda"), threads=1)
    x = input_batch(art, 8, seed=0)
    with torch.no_grad():
        for graphed, eager in GRAPH_ENGINES.items():
            want = eng.runner(eager, x)().clone()
            replay = eng.runner(graphed, x)
            out = replay()
            assert torch.equal(out, want), graphed
            out.zero_()
            assert torch.equal(replay(), want), graphed


@gpu
def test_export_validates_on_cuda(pruned, tmp_path):
    r = run_cli("export", pruned, "-o", tmp_path / "x", "--device", "cuda", "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["device"].startswith("cuda") and d["validation"]["safetensors"]["bit_exact"]
    assert all(c["ok"] for c in d["validation"]["onnx"].values())


def test_exact_fp32_turns_tf32_off_inside_and_restores_it():
    """References and error checks on CUDA must not run in TF32 (cuDNN's default for
    convolutions), and the flags are process-global: restored after, errors included."""
    from tedepr_cli.device import exact_fp32

    flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
    saved = tuple(f.allow_tf32 for f in flags)
    try:
        for f in flags:
            f.allow_tf32 = True
        with exact_fp32():
            assert not any(f.allow_tf32 for f in flags)
        assert all(f.allow_tf32 for f in flags)
        with pytest.raises(KeyError), exact_fp32():
            raise KeyError("boom")
        assert all(f.allow_tf32 for f in flags)
    finally:
        for f, v in zip(flags, saved, strict=True):
            f.allow_tf32 = v
