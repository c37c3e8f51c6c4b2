"""The planner's whole-model runtimes (issue 17): the dense model in the original layer
types, onnxruntime as a module, the choice among runtimes against the *original* dense model
on its best runtime, the cheap re-check of a stored plan, and that `accelerate`, `tedepr
plan` and the bench's tedepr engine run the chosen runtime. No timing assertions: every
decision is made against a fixed clock (``timing.interleaved`` replaced)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from tedepr_cli import timing, zoo
from tedepr_cli.arch import ArchSpec
from tedepr_cli.artifact import Artifact, load_artifact
from tedepr_cli.errors import UsageError
from tedepr_cli.execution import (
    OrtModule,
    Runtimes,
    build_model,
    dense_model,
    plan_execution,
    plan_for,
    recheck,
    store_plan,
)
from tedepr_cli.execution import planner as planner_mod
from tedepr_cli.execution import runtimes as runtimes_mod
from tedepr_cli.execution.store import PLANNER_VERSION
from tedepr_cli.pruning.prune import PruneOptions, prune

from .conftest import run_cli


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def compressed(name: str, **kw) -> Artifact:
    """A zoo model (random init, small), one-shot decomposed and pruned to 90 % (magnitude)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = getattr(zoo, name)(**kw).eval()
    opts = PruneOptions(sparsity=0.9, criterion="magnitude")
    art, _ = prune(Artifact(model=m, arch=ArchSpec(name, kw)), opts)
    art.model.eval()
    return art


@pytest.fixture(scope="module")
def lenet() -> Artifact:
    return compressed("lenet300")


def fixed_rounds(us: dict[str, float]):
    """A stand-in for timing.interleaved: every callable named in ``us`` takes that many µs
    in every round (other names 1000 µs); the callables are run once each (so they work)."""

    def fake(fns, plan, clock=None, timers=None, on_round=None):
        for f in fns.values():
            f()
        return {k: [1e-6 * us.get(k, 1000.0)] * plan.iters for k in fns}

    return fake


# ---------------------------------------------------------------------------- dense model
@pytest.mark.parametrize("name,kw,types", [
    ("lstm", {"hidden": 16, "input_size": 8}, (nn.LSTM,)),
    ("vit_tiny", {"dim": 16, "depth": 1, "heads": 2, "attn": "mha", "input_size": 8, "patch_size": 4},
     (nn.MultiheadAttention, nn.Linear)),
    ("lenet5", {"input_size": 16}, (nn.Conv2d, nn.Linear)),
])
def test_dense_model_has_the_original_layer_types_and_the_same_function(name, kw, types):
    art = compressed(name, **kw)
    dense, left = dense_model(art.model)
    assert left == []
    kinds = {type(m) for m in dense.modules()}
    assert set(types) <= kinds
    assert not any(hasattr(m, "cores") for m in dense.modules())  # no chain left
    assert not any("parametrizations" in n for n, _ in dense.named_parameters())  # masks folded
    original = getattr(zoo, name)(**kw)
    assert [type(m) for m in dense.modules()] == [type(m) for m in original.modules()]
    x = torch.rand(3, *art.input_shape)
    with torch.no_grad():
        assert rel(dense(x), art.model(x)) <= 1e-5


def test_dense_model_leaves_a_nonlinear_chain_and_says_so():
    from tedepr_cli.tensorized.layers import build_layer

    spec = {"type": "linear", "format": "tt", "in_modes": [2, 3], "out_modes": [2, 2], "bias": True,
            "chain": "nonlinear", "ranks": [1, 2, 1]}
    model = nn.Sequential(build_layer(spec), nn.ReLU(), nn.Linear(4, 2))
    dense, left = dense_model(model)
    assert left == ["0"] and hasattr(dense[0], "cores")


# ---------------------------------------------------------------------------- onnxruntime module
def test_ort_module_takes_and_returns_torch_tensors(lenet):
    m = OrtModule(runtimes_mod.onnx_bytes(lenet.model, lenet.input_shape), threads=1)
    x = torch.rand(5, 784)
    with torch.no_grad():
        y = m(x)
        assert isinstance(y, torch.Tensor) and y.shape == (5, 10)
        assert rel(y, lenet.model(x)) <= 1e-5
        assert torch.equal(copy.deepcopy(m)(x), y)
        assert torch.equal(m(x.double()), y)  # converted on the slow path
        wide = torch.cat([x, x], dim=1)[:, :784]  # a non-contiguous view holding x
        assert not wide.is_contiguous() and torch.equal(m(wide), y)
    leaf = x.clone().requires_grad_()  # numpy() refuses it: detached on the slow path
    assert torch.equal(m(leaf), y) and not m(leaf).requires_grad
    assert m.session.get_session_options().intra_op_num_threads == 1


def test_chain_ort_runs_the_onnx_fast_graph_and_falls_back_to_the_plain_one(lenet, monkeypatch, caplog):
    """The planner's `chain-ort` is the graph `export --to onnx-fast` writes and bench's
    engine of that name times (TedeprChain nodes over model-local functions, in stock
    onnxruntime), not the plain export; where that graph cannot be built, the plain one."""
    import onnx

    from tedepr_cli import export as export_mod
    from tedepr_cli.kernels.ort_ops import OP_TYPE

    x = torch.rand(4, 784)
    m = Runtimes(lenet).module("chain-ort")
    proto = onnx.load_from_string(m.onnx)
    assert any(n.op_type == OP_TYPE for n in proto.graph.node) and proto.functions
    with torch.no_grad():
        assert rel(m(x), lenet.model(x)) <= 1e-5

    def broken(*a, **k):
        raise RuntimeError("no fast graph here")

    monkeypatch.setattr(export_mod, "fast_onnx", broken)
    with caplog.at_level("INFO", logger="tedepr"):
        plain = Runtimes(lenet).module("chain-ort")
    assert not any(n.op_type == OP_TYPE for n in onnx.load_from_string(plain.onnx).graph.node)
    assert "no fast graph here" in caplog.text
    with torch.no_grad():
        assert rel(plain(x), lenet.model(x)) <= 1e-5


# ---------------------------------------------------------------------------- the choice
def test_each_onnxruntime_runtime_runs_at_its_fastest_level_the_dense_original_too(lenet, monkeypatch):
    """onnxruntime's default level (`all`) is not always its fastest (layout transforms put
    reorders around small convolutions): the planner times `chain-ort` and the dense
    original's `dense-ort` at every level, takes each at its fastest, and what it builds
    from the plan runs there."""
    monkeypatch.setattr(timing, "interleaved", fixed_rounds(
        {"layers": 50, "chain-ort": 30, "chain-ort@basic": 10, "original:dense-torch": 100,
         "original:dense-ort": 40, "original:dense-ort@basic": 20}))
    plan = plan_execution(lenet, 2)
    rts = plan["runtimes"]
    assert rts["ort_levels"] == {"chain-ort": "basic", "dense-ort": "basic"}
    assert rts["measured_us"] == {"layers": 50, "chain-ort": 10, "dense-torch": 100, "dense-ort": 20}
    assert plan["runtime"] == "chain-ort" and rts["baseline"] == {**rts["baseline"], "best": "dense-ort",
                                                                   "median_us": 20}
    built = build_model(lenet, plan)  # a fresh Runtimes: the level comes from the plan
    assert isinstance(built, OrtModule) and built.level == "basic"
    assert built.session.get_session_options().graph_optimization_level.name == "ORT_ENABLE_BASIC"
    dense = build_model(lenet, plan, runtime="dense-ort")
    assert isinstance(dense, OrtModule) and dense.level == "basic"
    x = torch.rand(2, 784)
    with torch.no_grad():
        assert rel(built(x), lenet.model(x)) <= 1e-5 and rel(dense(x), lenet.model(x)) <= 1e-5
    # the default level wins: recorded as such, and a tie goes to the default
    monkeypatch.setattr(timing, "interleaved", fixed_rounds(
        {"layers": 50, "chain-ort": 10, "chain-ort@basic": 10, "original:dense-torch": 100,
         "original:dense-ort": 20, "original:dense-ort@basic": 40}))
    plan = plan_execution(lenet, 2)
    assert plan["runtimes"]["ort_levels"] == {"chain-ort": "all", "dense-ort": "all"}
    assert build_model(lenet, plan).level == "all"
    # the fusing level (`extended`: Conv+Relu, MatMul+Add, no layout transforms) is timed too
    monkeypatch.setattr(timing, "interleaved", fixed_rounds(
        {"layers": 50, "chain-ort": 30, "chain-ort@basic": 20, "chain-ort@extended": 10,
         "original:dense-torch": 100, "original:dense-ort": 40, "original:dense-ort@extended": 15}))
    plan = plan_execution(lenet, 2)
    assert plan["runtimes"]["ort_levels"] == {"chain-ort": "extended", "dense-ort": "extended"}
    built = build_model(lenet, plan)
    assert built.session.get_session_options().graph_optimization_level.name == "ORT_ENABLE_EXTENDED"
    with torch.no_grad():
        assert rel(built(x), lenet.model(x)) <= 1e-5
    assert planner_mod._best_levels({"a": [3.0], "a@basic": [1.0], "b": [2.0]}) == \
        ({"a": [1.0], "b": [2.0]}, {"a": "basic"})
    # a level at which onnxruntime fails (or differs) is left out, not fatal
    rt = Runtimes(lenet)
    real = rt.module

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("onnxruntime refused the graph at this level")

    monkeypatch.setattr(rt, "module", lambda r, level=None: Broken() if level == "basic" else real(r, level))
    monkeypatch.setattr(timing, "interleaved", fixed_rounds(
        {"layers": 50, "chain-ort": 15, "chain-ort@basic": 1, "original:dense-torch": 100,
         "original:dense-ort": 40, "original:dense-ort@basic": 20}))
    plan = plan_execution(lenet, 2, runtimes=rt)
    assert plan["runtimes"]["ort_levels"] == {"chain-ort": "all", "dense-ort": "basic"}  # basic left out
    assert plan["runtime"] == "chain-ort"
    assert plan["runtimes"]["measured_us"]["chain-ort"] == 15


def test_planner_picks_the_fastest_compressed_runtime_only_if_it_beats_the_best_dense(lenet, monkeypatch):
    # the layers plan beats dense torch but not dense onnxruntime: the plan runs dense on onnxruntime
    monkeypatch.setattr(timing, "interleaved", fixed_rounds(
        {"layers": 50, "chain-ort": 80, "original:dense-torch": 100, "original:dense-ort": 40}))
    plan = plan_execution(lenet, 2)
    rts = plan["runtimes"]
    assert plan["runtime"] == "dense-ort" and rts["reason"].startswith("nothing beats dense")
    assert rts["baseline"]["best"] == "dense-ort" and rts["baseline"]["median_us"] == 40
    assert rts["measured_us"] == {"layers": 50, "chain-ort": 80, "dense-torch": 100, "dense-ort": 40}
    assert "original architecture (lenet300" in rts["baseline"]["model"]
    built = build_model(lenet, plan)
    assert isinstance(built, OrtModule)
    x = torch.rand(2, 784)
    with torch.no_grad():
        assert rel(built(x), lenet.model(x)) <= 1e-5  # the compressed model's function, run dense
    # the compressed ONNX is fastest: chosen, built as an onnxruntime module
    monkeypatch.setattr(timing, "interleaved", fixed_rounds(
        {"layers": 50, "chain-ort": 20, "original:dense-torch": 100, "original:dense-ort": 40}))
    plan = plan_execution(lenet, 2)
    assert plan["runtime"] == "chain-ort" and plan["runtimes"]["speedup_vs_best_dense"] == 2.0
    assert isinstance(build_model(lenet, plan), OrtModule)
    # the per-layer plan is fastest: the kernels' model
    monkeypatch.setattr(timing, "interleaved", fixed_rounds(
        {"layers": 10, "chain-ort": 20, "original:dense-torch": 100, "original:dense-ort": 40}))
    plan = plan_execution(lenet, 2)
    assert plan["runtime"] == "layers" and not isinstance(build_model(lenet, plan), OrtModule)
    # the dense torch is the best dense: a compressed runtime must beat it, else dense torch
    monkeypatch.setattr(timing, "interleaved", fixed_rounds(
        {"layers": 60, "chain-ort": 70, "original:dense-torch": 50, "original:dense-ort": 90}))
    plan = plan_execution(lenet, 2)
    assert plan["runtime"] == "dense-torch"
    dense = build_model(lenet, plan)
    assert {type(m) for m in dense.modules()} == {type(m) for m in zoo.lenet300().modules()}


def test_a_lower_median_that_loses_most_paired_rounds_does_not_win(lenet, monkeypatch):
    """Noise: the compressed runtime's median is lower, but it was slower than dense in most
    rounds measured side by side: dense stays."""

    def fake(fns, plan, clock=None, timers=None, on_round=None):
        n = plan.iters
        dense = [1e-6 * (10, 10, 50, 50, 50)[i % 5] for i in range(n)]  # median 50
        comp = [1e-6 * (12, 12, 55, 55, 5)[i % 5] for i in range(n)]  # median 12, slower in 4 of 5
        out = {k: [1e-3] * n for k in fns}
        if "layers" in out:  # the whole-model round (per-layer decisions see 1 ms everywhere)
            out["layers"], out["original:dense-torch"] = comp, dense
        return out

    monkeypatch.setattr(timing, "interleaved", fake)
    plan = plan_execution(lenet, 2, rounds=10)
    rts = plan["runtimes"]
    assert rts["measured_us"]["layers"] < rts["measured_us"]["dense-torch"]
    assert rts["paired_ratio"] > 1.0 and plan["runtime"] == "dense-torch"


def test_the_baseline_is_the_original_model_not_the_compressed_one_rebuilt(lenet, monkeypatch):
    calls = []
    real = runtimes_mod.original_model

    def spy(art, seed=0):
        calls.append(seed)
        return real(art, seed)

    monkeypatch.setattr(runtimes_mod, "original_model", spy)
    monkeypatch.setattr(timing, "interleaved", fixed_rounds({"layers": 10}))
    rt = Runtimes(lenet, 1, seed=3)
    plan_execution(lenet, 1, runtimes=rt, seed=3)
    assert calls == [3]
    base = rt.baseline("dense-torch")
    dense, _ = rt.dense()
    assert base is not dense and not torch.equal(base.fc1.weight, dense.fc1.weight)
    # without an architecture (the Python API on a model you hold): the dense rebuild
    api = Artifact(model=lenet.model, arch=None)
    assert "rebuilt" in runtimes_mod.original_model(api)[1]


def test_an_inexact_runtime_is_never_chosen(lenet, monkeypatch):
    monkeypatch.setattr(timing, "interleaved", fixed_rounds({"chain-ort": 1, "original:dense-torch": 100,
                                                             "original:dense-ort": 100}))
    monkeypatch.setattr(planner_mod, "ONNX_RTOL", -1.0)  # no runtime is that exact
    plan = plan_execution(lenet, 2)
    assert plan["runtime"] == "layers" and "chain-ort" in plan["runtimes"]["unavailable"]


def test_forced_and_unknown_runtimes(lenet):
    plan = plan_execution(lenet, 1, runtime="chain-ort")
    assert plan["runtime"] == "chain-ort" and plan["runtimes"]["reason"] == "override"
    with pytest.raises(UsageError):
        plan_execution(lenet, 1, runtime="gpu")
    with pytest.raises(UsageError):
        build_model(lenet, plan, runtime="gpu")


# ---------------------------------------------------------------------------- re-check at load
def test_a_stored_plan_is_rechecked_and_falls_back_when_clearly_slower(lenet, monkeypatch, caplog):
    art = copy.copy(lenet)
    art.meta = copy.deepcopy(lenet.meta)
    monkeypatch.setattr(timing, "interleaved", fixed_rounds(
        {"layers": 10, "chain-ort": 20, "original:dense-torch": 100, "original:dense-ort": 40}))
    store_plan(art, plan_execution(art, 2))
    # now the chosen runtime takes 2x the dense model's time: back to dense, with a warning
    monkeypatch.setattr(timing, "interleaved", fixed_rounds({"chosen": 80, "dense": 40}))
    with caplog.at_level("WARNING", logger="tedepr"):
        plan, fresh = plan_for(art, 2)
    assert not fresh and plan["runtime"] == "dense-ort" and plan["recheck"]["fallback"]
    assert "running dense" in caplog.text
    assert isinstance(build_model(art, plan), OrtModule)
    # a little slower is noise: the stored plan stays
    monkeypatch.setattr(timing, "interleaved", fixed_rounds({"chosen": 45, "dense": 40}))
    plan, _ = plan_for(art, 2)
    assert plan["runtime"] == "layers" and not plan["recheck"]["fallback"]
    assert recheck(art, {**plan, "runtime": "dense-ort"})["recheck"]["skipped"]


def test_plans_of_the_previous_planner_are_remade(lenet, monkeypatch):
    art = copy.copy(lenet)
    art.meta = copy.deepcopy(lenet.meta)
    monkeypatch.setattr(timing, "interleaved", fixed_rounds({"layers": 10}))
    store_plan(art, plan_execution(art, 1))
    art.meta["execution"]["plans"]["1"]["planner"] = 2  # before whole-model runtimes
    assert plan_for(art, 1)[1]


# ---------------------------------------------------------------------------- the users
def test_accelerate_runs_the_chosen_runtime(lenet, monkeypatch):
    import tedepr_cli as tedepr

    monkeypatch.setattr(timing, "interleaved", fixed_rounds(
        {"layers": 50, "chain-ort": 20, "original:dense-torch": 100, "original:dense-ort": 40}))
    torch.set_num_threads(2)
    fast = tedepr.accelerate(lenet.model, batch=3, threads=1)
    assert torch.get_num_threads() == 2
    assert isinstance(fast, OrtModule) and fast.tedepr_plan["runtime"] == "chain-ort"
    assert "rebuilt" in fast.tedepr_plan["runtimes"]["baseline"]["model"]
    x = torch.rand(3, 784)
    with torch.no_grad():
        assert rel(fast(x), lenet.model(x)) <= 1e-5


def test_plan_command_stores_the_runtime_and_bench_runs_it(lenet, tmp_path):
    from tedepr_cli.artifact import save_artifact
    from tedepr_cli.bench.engines import Engines

    src = save_artifact(lenet, tmp_path / "a.safetensors")
    out = tmp_path / "planned.safetensors"
    r = run_cli("plan", src, "--batch", "2", "--runtime", "dense-torch", "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["plans"]["2"]["runtime"] == "dense-torch"
    art = load_artifact(out)
    stored = art.meta["execution"]["plans"]["2"]
    assert stored["runtime"] == "dense-torch" and stored["planner"] == PLANNER_VERSION
    plan, fresh = plan_for(art, 2)
    assert not fresh
    eng = Engines(art, None, torch.device("cpu"), 1)
    x = torch.rand(2, 784)
    with torch.no_grad():
        y = eng.runner("tedepr", x, plan)()
        assert rel(y, art.model(x)) <= 1e-5
    assert eng.runtimes._dense is not None  # the tedepr engine ran the dense model
    r = run_cli("plan", src, "--batch", "2", "--runtime", "gpu", "-o", tmp_path / "x.safetensors")
    assert r.exit_code == 2 and r.stderr.startswith("tedepr: ") and "--runtime" in r.stderr


# ---------------------------------------------------------------------------- names
def test_the_old_runtime_name_onnx_is_chain_ort_with_a_deprecation_warning(lenet, monkeypatch, caplog):
    """The planner called the compressed ONNX in onnxruntime `onnx`, bench `chain-ort`: one
    name now, `chain-ort`; `onnx` (plan --runtime, the API, plans stored before) still works."""
    from tedepr_cli.execution import RUNTIMES

    assert "chain-ort" in RUNTIMES and "onnx" not in RUNTIMES
    with caplog.at_level("WARNING", logger="tedepr"):
        plan = plan_execution(lenet, 1, runtime="onnx")
    assert plan["runtime"] == "chain-ort" and "deprecated" in caplog.text and "'chain-ort'" in caplog.text
    assert isinstance(build_model(lenet, plan), OrtModule)
    caplog.clear()
    with caplog.at_level("WARNING", logger="tedepr"):
        assert isinstance(build_model(lenet, {**plan, "runtime": "onnx"}), OrtModule)  # a plan stored before
        assert isinstance(build_model(lenet, plan, runtime="onnx"), OrtModule)
    assert caplog.text.count("deprecated") == 1  # the caller's word, not the stored plan's
    # a plan stored before the rename reads back under the new names, on the same machine
    art = copy.copy(lenet)
    art.meta = copy.deepcopy(lenet.meta)
    monkeypatch.setattr(timing, "interleaved", fixed_rounds(
        {"layers": 50, "chain-ort": 20, "original:dense-torch": 100, "original:dense-ort": 40}))
    store_plan(art, plan_execution(art, 2))
    old = art.meta["execution"]["plans"]["2"]
    old["runtime"] = "onnx"
    old["runtimes"]["measured_us"]["onnx"] = old["runtimes"]["measured_us"].pop("chain-ort")
    old["runtimes"]["chosen"] = "onnx"
    plan, fresh = plan_for(art, 2, check=False)
    assert not fresh and plan["runtime"] == "chain-ort" and plan["runtimes"]["chosen"] == "chain-ort"
    measured = plan["runtimes"]["measured_us"]
    assert "onnx" not in measured and measured["chain-ort"] == 20


def test_plan_runtime_flag_takes_chain_ort_and_the_old_name(tmp_path):
    from .conftest import LENET300

    art = tmp_path / "a"
    assert run_cli("prune", LENET300, "--arch", "lenet300", "--sparsity", "0.99", "-o", art, "-q",
                   "--criterion", "magnitude").exit_code == 0
    for name in ("chain-ort", "onnx"):
        r = run_cli("plan", art, "--batch", "1", "--runtime", name, "-o", tmp_path / name, "--json")
        assert r.exit_code == 0, r.stderr
        assert json.loads(r.stdout)["plans"]["1"]["runtime"] == "chain-ort"
        assert ("deprecated" in r.stderr) == (name == "onnx")
    r = run_cli("plan", art, "--runtime", "gpu", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "chain-ort" in r.stderr
