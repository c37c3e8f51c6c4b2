"""The execution planner's fused chains (issue #7): which graphs fuse and which must not,
the fused program against float64 references and the unfused model, output buffers that
never alias, fallbacks, and what the plan records. No timing assertions: where a decision
depends on a measurement, the clock is replaced by a fixed one."""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tedepr_cli import execution, timing
from tedepr_cli.artifact import Artifact
from tedepr_cli.execution import (
    build_model,
    find_runs,
    flop_share,
    fused_module,
    plan_execution,
    plan_for,
    store_plan,
)
from tedepr_cli.kernels import build
from tedepr_cli.kernels.cpu import FusedSequence, SparseChainKernel
from tedepr_cli.masks import attach_masks, plain_named_parameters
from tedepr_cli.tensorized.layers import build_layer

from .conftest import LENET300

TOL = 1e-5
needs_kernel = pytest.mark.skipif(not build.available(), reason="compiled kernels unavailable")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def tt(ins: list[int], outs: list[int], r: int, density: float, seed: int) -> nn.Module:
    spec = {"type": "linear", "format": "tt", "in_modes": ins, "out_modes": outs, "bias": True,
            "chain": "linear", "ranks": [1] + [r] * (len(ins) - 1) + [1]}
    layer = build_layer(spec).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for c in layer.cores:
            c.copy_(torch.randn(c.shape, generator=g) * (torch.rand(c.shape, generator=g) < density))
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
    return layer


def pruned_linear(n: int, m: int, density: float, seed: int) -> tuple[nn.Linear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n, m)
    mask = torch.rand(m, n, generator=g) < density
    with torch.no_grad():
        lin.weight.mul_(mask)
    return lin, mask


class Net(nn.Module):
    """flatten -> TT -> relu -> TT -> relu -> pruned Linear [-> relu] [* 2]: LeNet's shape."""

    input_shape = (3, 4, 4)
    input_kind = "image"

    def __init__(self, trailing: bool = False, scale: bool = False) -> None:
        super().__init__()
        self.fc1 = tt([6, 8], [4, 5], 3, 0.5, 1)  # 48 -> 20
        self.fc2 = tt([4, 5], [3, 4], 3, 0.6, 2)  # 20 -> 12
        self.fc3, self.mask3 = pruned_linear(12, 7, 0.5, 3)
        self.trailing, self.scale = trailing, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.fc2(x).relu()
        y = self.fc3(x)
        if self.trailing:
            y = F.relu(y)
        return y * 2 if self.scale else y


def artifact(model: nn.Module) -> Artifact:
    masks = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "cores"):
            masks.update({f"{name}.cores.{i}": c.detach() != 0 for i, c in enumerate(mod.cores)})
        elif isinstance(mod, nn.Linear) and hasattr(model, "mask3") and name == "fc3":
            masks[f"{name}.weight"] = model.mask3
    model.eval()
    attach_masks(model, masks)
    return Artifact(model=model, arch=None)


def ref64(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


FUSION = {"layers": ["fc1", "fc2", "fc3"], "acts": ["relu", "relu", None], "flatten": True}


# ---------------------------------------------------------------------------- pattern
def test_finds_the_lenet_chain():
    assert find_runs(Net()) == [FUSION]
    assert find_runs(Net(trailing=True))[0]["acts"] == ["relu", "relu", "relu"]
    from tedepr_cli.arch import build as build_arch
    from tedepr_cli.arch import parse_arch

    assert find_runs(build_arch(parse_arch("lenet300"))) == [FUSION]


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        return self.fc2(h) + h  # h has two users


class SideOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        a = self.fc1(x)
        return self.fc2(F.relu(a)), a  # the pre-activation is used outside the chain


class Tanh(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.fc2(F.relu(self.fc1(x)))
        return x


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc1, self.fc2 = nn.Conv2d(1, 2, 3), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.conv(x).flatten(2)  # flatten(2): not the flatten a run absorbs
        return self.fc2(self.fc1(h))


def test_refuses_non_matching_graphs():
    assert find_runs(Residual()) == [{"layers": ["fc1"], "acts": ["relu"], "flatten": False}]
    assert find_runs(SideOutput()) == []
    assert find_runs(Tanh()) == []
    assert find_runs(Branchy()) == []
    assert find_runs(Convs()) == [{"layers": ["fc1", "fc2"], "acts": [None, None], "flatten": False}]
    # an excluded layer (e.g. overridden) splits the run
    assert find_runs(Net(), lambda name, layer: name != "fc2") == [  # one layer and its ReLU
        {"layers": ["fc1"], "acts": ["relu"], "flatten": True}]
    assert find_runs(Net(), lambda name, layer: name != "fc3") == [
        {"layers": ["fc1", "fc2"], "acts": ["relu", "relu"], "flatten": True}]


# ---------------------------------------------------------------------------- the program
def fused(model: nn.Module, variants=("chain", "chain", "matrix"), **kw) -> FusedSequence:
    art = artifact(model)
    run = find_runs(model)[0]
    return fused_module(model, {**run, "variants": list(variants), **kw}, art.masks)


@needs_kernel
@pytest.mark.parametrize("variants", [("chain", "chain", "matrix"), ("dense", "chain", "matrix"),
                                      ("dense", "dense", "matrix")])
@pytest.mark.parametrize("trailing", [False, True])
def test_fused_matches_float64_and_unfused(variants, trailing):
    model = Net(trailing=trailing)
    fs = fused(model, variants)
    assert fs.compiled and fs.flatten and fs.acts[-1] == ("relu" if trailing else None)
    g = torch.Generator().manual_seed(0)
    for b in (1, 2, 7, 16, 33, 128):
        x = torch.randn(b, 3, 4, 4, generator=g)
        with torch.no_grad():
            y = fs(x)
            unfused = model(x)
        assert y.shape == (b, 7) and y.dtype == torch.float32
        assert rel(y, ref64(model, x)) <= TOL
        assert rel(y, unfused) <= TOL
    for chunk in (1, 5, 16, 32):  # batch chunks: every split gives the same result
        fs.chunk = chunk
        x = torch.randn(37, 3, 4, 4, generator=g)
        with torch.no_grad():
            assert rel(fs(x), ref64(model, x)) <= TOL


@needs_kernel
def test_outputs_never_alias_and_batch_size_changes():
    model = Net()
    fs = fused(model)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(b, 3, 4, 4, generator=g) for b in (1, 1, 32, 5, 1, 32)]
    with torch.no_grad():
        ys = [fs(x) for x in xs]  # all kept alive: a reused output buffer would overwrite them
        refs = [model(x) for x in xs]
    assert len({y.data_ptr() for y in ys}) == len(ys)
    for y, r in zip(ys, refs, strict=True):
        assert rel(y, r) <= TOL
    # the input is never written
    x = torch.randn(4, 3, 4, 4, generator=g)
    x0 = x.clone()
    with torch.no_grad():
        fs(x)
    assert torch.equal(x, x0)


@needs_kernel
def test_concurrent_calls_use_their_own_workspaces():
    model = Net()
    fs = fused(model)
    errors: list[float] = []

    def work(b: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for _ in range(50):
            x = torch.randn(b, 3, 4, 4, generator=g)
            with torch.no_grad():
                errors.append(rel(fs(x), model(x)))

    threads = [threading.Thread(target=work, args=(b, b)) for b in (1, 33, 64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 150 and max(errors) <= TOL


@needs_kernel
def test_shapes_fallbacks_and_hooks():
    model = Net()
    fs = fused(model)
    x = torch.randn(6, 3, 4, 4)
    with torch.no_grad():
        ref = model(x)
        assert rel(fs(x.reshape(6, 48)), ref) <= TOL  # already flat
        xt = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # non-contiguous
        assert rel(fs(xt), ref) <= TOL
        assert fs(torch.zeros(0, 3, 4, 4)).shape == (0, 7)
        with pytest.raises(RuntimeError):  # another dtype runs the layers: as the model does
            model(x.double())
        with pytest.raises(RuntimeError):
            fs(x.double())
        with pytest.raises(ValueError):
            fs(torch.randn(6, 47))
    # autograd and training run the original layers
    xg = x.clone().requires_grad_()
    y = fs(xg)
    assert y.grad_fn is not None
    y.sum().backward()
    assert xg.grad is not None and plain_named_parameters(model)["fc1.cores.0"].grad is not None
    fs.train()
    assert torch.equal(fs(x), model(x))
    fs.eval()
    # hooks still run (the fast path skips only nn.Module's dispatch, never a hook)
    seen = []
    h = fs.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    with torch.no_grad():
        fs(x)
    h.remove()
    assert seen == [torch.Size([6, 7])]
    # without flatten: (..., N) like nn.Linear
    k = SparseChainKernel.from_linear(nn.Linear(5, 4))
    plain = FusedSequence([k], ["relu"]).eval()
    z = torch.randn(2, 3, 5)
    with torch.no_grad():
        assert plain(z).shape == (2, 3, 4)
        assert rel(plain(z), torch.relu(k.torch_path(z))) <= TOL
    # a copy is independent and equal
    cp = copy.deepcopy(fs)
    with torch.no_grad():
        assert torch.equal(cp(x), fs(x))


def test_program_validation():
    a = SparseChainKernel.from_linear(nn.Linear(5, 4))
    b = SparseChainKernel.from_linear(nn.Linear(3, 2))
    with pytest.raises(ValueError):
        FusedSequence([a, b], [None, None])  # 4 features into a 3-feature layer
    with pytest.raises(ValueError):
        FusedSequence([a], ["gelu"])
    with pytest.raises(ValueError):
        FusedSequence([a], [None, None])


# ---------------------------------------------------------------------------- the planner
def fixed_clock(prefer_fused: bool = True):
    """A stand-in for timing.medians: fixed figures, so decisions do not depend on load."""

    def fake(fns, reps, warmup=2, clock=None):
        out = {}
        for k in fns:
            if k.startswith("chunk"):
                out[k] = 1e-6 if prefer_fused else 9e-6
            else:
                out[k] = {"unfused": 5e-6, "planned": 1e-6, "dense": 2e-6, "kernel": 1e-6}.get(k, 3e-6)
        return out

    return fake


@needs_kernel
def test_plan_records_fusion_and_builds_it(monkeypatch):
    monkeypatch.setattr(timing, "medians", fixed_clock())
    for model in (Net(), Net(scale=True)):
        art = artifact(model)
        plan = plan_execution(art, 1, runtime="layers")
        (f,) = plan["fusions"]
        assert f["layers"] == FUSION["layers"] and f["acts"] == FUSION["acts"] and f["flatten"]
        assert f["variants"][2] == "matrix" and f["reason"] == "fastest measured"
        assert f["max_rel_err"] <= TOL
        assert all(plan["layers"][n]["fused"] == f["name"] for n in ("fc1", "fc2", "fc3"))
        built = build_model(art, plan)
        # the whole model is one run: the fused module itself; otherwise an fx GraphModule
        assert isinstance(built, FusedSequence) != model.scale
        x = torch.randn(3, 3, 4, 4)
        with torch.no_grad():
            assert rel(built(x), ref64(model, x)) <= TOL
        share = flop_share(art.model, art.masks, plan)
        assert share["kernel_flops"] > 0 and share["torch_chain_flops"] == 0


class TwoRuns(Net):
    """Two fusable runs split by a scale: [fc1 -> relu -> fc2 -> relu] * 0.5 [fc3 -> relu]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))) * 0.5
        return F.relu(self.fc3(x))


@needs_kernel
def test_a_plan_with_two_fusions_builds_both(monkeypatch):
    """Each recorded run becomes its own fused call (the second one used to be built from the
    first run's input node instead of the model: an internal error in `tedepr plan`)."""
    monkeypatch.setattr(timing, "medians", fixed_clock())
    model = TwoRuns()
    art = artifact(model)
    plan = plan_execution(art, 1, runtime="layers")
    assert [f["layers"] for f in plan["fusions"]] == [["fc1", "fc2"], ["fc3"]]
    built = build_model(art, plan)
    assert sum(isinstance(m, FusedSequence) for m in built.modules()) == 2
    x = torch.randn(3, 3, 4, 4)
    with torch.no_grad():
        assert rel(built(x), ref64(model, x)) <= TOL


@needs_kernel
def test_plan_refuses_slower_or_inexact_fusion(monkeypatch):
    art = artifact(Net())
    monkeypatch.setattr(timing, "medians", fixed_clock(prefer_fused=False))
    assert plan_execution(art, 1, runtime="layers")["fusions"] == []
    monkeypatch.setattr(timing, "medians", fixed_clock())
    monkeypatch.setattr(execution.fusion, "FUSION_RTOL", -1.0)  # no output is that exact
    assert plan_execution(art, 1, runtime="layers")["fusions"] == []
    monkeypatch.setattr(execution.fusion, "FUSION_RTOL", TOL)
    assert plan_execution(art, 1, fuse=False, runtime="layers")["fusions"] == []
    plan = plan_execution(art, 1, overrides={"fc2": "torch"}, runtime="layers")  # an override splits the run
    assert [f["layers"] for f in plan["fusions"]] == [["fc1"]] and "fused" not in plan["layers"]["fc2"]
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert rel(build_model(art, plan)(x), ref64(art.model, x)) <= TOL


@needs_kernel
def test_cost_model_fuses_without_timing():
    art = artifact(Net())
    plan = plan_execution(art, 1, timing=False)
    (f,) = plan["fusions"]
    assert f["reason"] == "cost model" and f["estimate_us"]["fused"] < f["estimate_us"]["unfused"]


@needs_kernel
def test_stored_plan_is_reused_and_a_stale_fusion_is_skipped(monkeypatch, caplog):
    monkeypatch.setattr(timing, "medians", fixed_clock())
    art = artifact(Net())
    plan = plan_execution(art, 2, runtime="layers")
    store_plan(art, plan)
    again, fresh = plan_for(art, 2)
    assert not fresh and again["fusions"] == plan["fusions"]
    art.meta["execution"]["plans"]["2"]["planner"] = 1  # made by an older planner: re-made
    assert plan_for(art, 2)[1]
    stale = copy.deepcopy(plan)
    stale["fusions"][0]["acts"] = [None, None, None]
    with caplog.at_level("WARNING", logger="tedepr"):
        built = build_model(art, stale)
    assert "does not match" in caplog.text
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert rel(built(x), art.model(x)) <= TOL


@needs_kernel
def test_pruned_lenet300_plan(monkeypatch):
    """The bundled LeNet-300-100, decomposed and pruned to 99.5 %: one fused call for the
    whole model (the tedepr engine of `tedepr bench`)."""
    from tedepr_cli.arch import parse_arch
    from tedepr_cli.loading import load_model
    from tedepr_cli.pruning.prune import PruneOptions, prune

    monkeypatch.setattr(timing, "medians", fixed_clock())
    art, _ = prune(load_model(LENET300, parse_arch("lenet300")),
                   PruneOptions(sparsity=0.995, criterion="magnitude"))
    for b in (1, 32):
        plan = plan_execution(art, b, runtime="layers")
        (f,) = plan["fusions"]  # prune decomposes first: TT layers, as chains or rebuilt matrices
        assert f["layers"] == ["fc1", "fc2", "fc3"] and set(f["variants"]) <= {"chain", "dense"}
        built = build_model(art, plan)
        x = torch.rand(b, 784)
        with torch.no_grad():
            assert rel(built(x), ref64(art.model, x)) <= TOL
            assert math.isfinite(float(built(x).sum()))
