"""The LSTM paths of issue 17: the compiled recurrence (``kernels/lstm.c`` through
:class:`KernelLSTM`) against torch's LSTM in float64, the planner's LSTM choice, and the
tensorized LSTM's fused training path (same function and gradients as the step loop, one
fused autograd node instead of a graph per time step). No timing assertions."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from tedepr_cli import timing
from tedepr_cli.arch import build, parse_arch
from tedepr_cli.artifact import Artifact
from tedepr_cli.decompose import DecomposeOptions, decompose
from tedepr_cli.execution import build_layers, candidates, options, plan_execution
from tedepr_cli.kernels.build import load_lstm
from tedepr_cli.kernels.lstm import KernelLSTM
from tedepr_cli.masks import attach_masks, folded_copy
from tedepr_cli.pruning.prune import PruneOptions, prune
from tedepr_cli.tensorized.layers import build_layer, to_dense_layer
from tedepr_cli.tensorized.wrappers import TensorizedLSTM

from .conftest import ZOO_CASES

TOL = 1e-5
needs_lstm_kernel = pytest.mark.skipif(load_lstm() is None, reason="compiled LSTM kernel unavailable")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def pruned_lstm(layers: int, bidirectional: bool, batch_first: bool, density: float = 0.3,
                seed: int = 0) -> tuple[nn.LSTM, dict[str, torch.Tensor]]:
    """An ``nn.LSTM`` whose weights are masked at ``density``; the masks by plain name."""
    g = torch.Generator().manual_seed(seed)
    lstm = nn.LSTM(12, 8, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first).eval()
    masks = {}
    with torch.no_grad():
        for n, p in lstm.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            if n.startswith("weight"):
                masks[n] = torch.rand(p.shape, generator=g) < density
                p.mul_(masks[n])
    return lstm, masks


def outputs_close(got, ref) -> float:
    return max(rel(got[0], ref[0]), rel(got[1][0], ref[1][0]), rel(got[1][1], ref[1][1]))


# ---------------------------------------------------------------------------- compiled recurrence
@needs_lstm_kernel
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("batch", [1, 7])
def test_kernel_lstm_equals_torch_lstm(bidirectional, layers, batch_first, batch):
    lstm, masks = pruned_lstm(layers, bidirectional, batch_first)
    kern = KernelLSTM(lstm, masks).eval()
    kern.lstm = None  # the C path must not fall back to the module: this would raise
    g = torch.Generator().manual_seed(1)
    shape = (batch, 6, 12) if batch_first else (6, batch, 12)
    x = torch.randn(shape, generator=g)
    n = layers * (2 if bidirectional else 1)
    hx = (torch.randn(n, batch, 8, generator=g), torch.randn(n, batch, 8, generator=g))
    ref_lstm = copy.deepcopy(lstm).double()
    with torch.no_grad():
        for state in (None, hx):
            ref = ref_lstm(x.double(), None if state is None else tuple(t.double() for t in state))
            got = kern(x, state)
            assert got[0].shape == ref[0].shape and got[1][0].shape == ref[1][0].shape
            assert outputs_close(got, ref) <= TOL


@needs_lstm_kernel
def test_kernel_lstm_honours_the_masks_and_stores_only_kept_entries():
    """The masks decide what W_hh keeps: values under a False mask entry are never read."""
    lstm, masks = pruned_lstm(2, True, True)
    noisy = copy.deepcopy(lstm)
    with torch.no_grad():  # garbage where the masks are False
        for n, p in noisy.named_parameters():
            if n in masks:
                p.add_(torch.randn(p.shape) * ~masks[n])
    kern = KernelLSTM(noisy, masks).eval()
    assert kern.kept_hh() == sum(int(m.sum()) for n, m in masks.items() if "_hh_" in n)
    x = torch.randn(3, 5, 12)
    with torch.no_grad():
        assert outputs_close(kern(x), copy.deepcopy(lstm).double()(x.double())) <= TOL


@needs_lstm_kernel
@pytest.mark.parametrize("fmt", ["tt", "tr"])
def test_kernel_lstm_on_a_pruned_tensorized_lstm(fmt):
    """The zoo LSTM (2 layers, bidirectional), decomposed and pruned: the compiled module
    equals the artifact model's own LSTM forward."""
    torch.manual_seed(0)
    spec = parse_arch("lstm", json.dumps({**ZOO_CASES["lstm"], "num_layers": 2, "bidirectional": True}))
    art = Artifact(model=build(spec).eval(), arch=spec)
    dec, _ = decompose(art, DecomposeOptions(format=fmt, rank=2, init="random", seed=1))
    pruned, _ = prune(dec, PruneOptions(sparsity=0.95, criterion="magnitude"))
    model = folded_copy(pruned.model).eval()
    assert isinstance(model.lstm, TensorizedLSTM)
    kern = KernelLSTM(model.lstm, pruned.masks, "lstm").eval()
    assert kern.kept_hh() == sum(int(m.sum()) for n, m in pruned.masks.items() if "weight_hh" in n)
    assert kern.kept_hh() < sum(getattr(model.lstm, f"weight_hh_{s}").numel() for s in model.lstm._suffixes())
    for b in (1, 7):
        x = torch.rand(b, *pruned.input_shape)
        with torch.no_grad():
            ref = copy.deepcopy(model.lstm).double()(x.double())
            assert outputs_close(kern(x), ref) <= TOL


@needs_lstm_kernel
def test_kernel_lstm_falls_back_where_c_cannot_run():
    lstm, masks = pruned_lstm(1, False, True)
    kern = KernelLSTM(lstm, masks).eval()
    calls = []
    lstm.register_forward_hook(lambda m, a, o: calls.append(1))
    x = torch.randn(2, 4, 12)
    with torch.no_grad():
        kern(x)
        assert not calls  # float32 CPU inference: C
        kern(x[0])  # unbatched input: the module
        assert len(calls) == 1
    kern(x.requires_grad_())  # autograd on the input: the module
    assert len(calls) == 2
    with torch.no_grad():
        kern.train()(x)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="proj_size"):
        KernelLSTM(nn.LSTM(4, 6, proj_size=3))


# ---------------------------------------------------------------------------- planner
def fixed_clock(fns, reps, warmup=2, clock=None):
    """timing.medians with fixed figures: the kernel is fastest, so decisions ignore load."""
    return {k: {"kernel": 1e-6, "planned": 1e-6, "dense": 2e-6}.get(k, 3e-6) for k in fns}


def lstm_artifact(bidirectional: bool = False) -> Artifact:
    torch.manual_seed(0)
    spec = parse_arch("lstm", json.dumps({**ZOO_CASES["lstm"], "bidirectional": bidirectional}))
    art = Artifact(model=build(spec).eval(), arch=spec)
    dec, _ = decompose(art, DecomposeOptions(format="tt", rank=2, init="random", seed=1))
    out, _ = prune(dec, PruneOptions(sparsity=0.95, criterion="magnitude"))
    return out


@needs_lstm_kernel
def test_planner_plans_the_lstm_as_one_layer_and_can_choose_the_kernel(monkeypatch):
    monkeypatch.setattr(timing, "medians", fixed_clock)
    art = lstm_artifact(bidirectional=True)
    model = folded_copy(art.model).eval()
    cands = candidates(model, art.masks)
    assert "lstm" in cands and not any(n.startswith("lstm.") for n in cands)
    assert set(options("lstm", model.lstm, art.masks, 1)) == {"torch", "dense", "kernel"}
    for b in (1, 7):
        plan = plan_execution(art, b, fuse=False)
        row = plan["layers"]["lstm"]
        assert row["choice"] == "kernel" and set(row["measured_us"]) == {"torch", "dense", "kernel"}
        built = build_layers(art, plan)  # the per-layer plan (the runtime choice is tested in test_runtimes)
        assert isinstance(built.lstm, KernelLSTM)
        x = torch.rand(b, *art.input_shape)
        with torch.no_grad():
            assert rel(built(x), copy.deepcopy(art.model).double()(x.double())) <= TOL


@needs_lstm_kernel
def test_planner_can_choose_the_kernel_for_a_pruned_nn_lstm(monkeypatch):
    """The dense-weight baseline (`prune --no-decompose`): a plain nn.LSTM with masked
    weights is planned whole too, and its compiled module equals the model."""
    monkeypatch.setattr(timing, "medians", fixed_clock)
    torch.manual_seed(0)
    spec = parse_arch("lstm", json.dumps({**ZOO_CASES["lstm"], "num_layers": 2}))
    art, _ = prune(Artifact(model=build(spec).eval(), arch=spec),
                   PruneOptions(sparsity=0.9, criterion="magnitude", decompose=False))
    assert isinstance(art.model.lstm, nn.LSTM) and "lstm.weight_hh_l1" in art.masks
    model = folded_copy(art.model).eval()
    assert "lstm" in candidates(model, art.masks)
    assert set(options("lstm", model.lstm, art.masks, 1)) == {"dense", "kernel"}
    plan = plan_execution(art, 3, fuse=False)
    assert plan["layers"]["lstm"]["choice"] == "kernel"
    built = build_layers(art, plan)  # the per-layer plan (the runtime choice is tested in test_runtimes)
    assert isinstance(built.lstm, KernelLSTM)
    x = torch.rand(3, *art.input_shape)
    with torch.no_grad():
        assert rel(built(x), copy.deepcopy(art.model).double()(x.double())) <= TOL


def test_planner_dense_choice_is_the_equivalent_nn_lstm():
    art = lstm_artifact()
    model = folded_copy(art.model).eval()
    dense = to_dense_layer(model.lstm)
    assert isinstance(dense, nn.LSTM)
    x = torch.rand(3, *art.input_shape)
    with torch.no_grad():
        assert outputs_close(dense(x), copy.deepcopy(model.lstm).double()(x.double())) <= TOL


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_planner_keeps_torch_for_an_lstm_the_kernel_does_not_take(monkeypatch):
    """A pruned nn.LSTM with projections: no compiled choice, and the plan says why."""
    monkeypatch.setattr(timing, "medians", fixed_clock)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(6, 8, proj_size=4, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[0][:, -1]

    net = Net().eval()
    net.input_shape = (5, 6)
    art = Artifact(model=net, arch=None)
    attach_masks(art.model, {"rnn.weight_hh_l0": torch.rand(32, 4) < 0.5})
    assert "kernel" not in options("rnn", art.model.rnn, art.masks, 1)
    plan = plan_execution(art, 1, fuse=False)
    row = plan["layers"]["rnn"]
    assert row["choice"] == "dense" and "proj_size" in row["unavailable"]["kernel"]


# ---------------------------------------------------------------------------- training path
def small_lstm_spec(bidirectional: bool, layers: int, batch_first: bool) -> dict:
    """A small tensorized LSTM's spec: input 12, hidden 8, TT input projections (ranks 1-3-1)."""
    ih = []
    dirs = 2 if bidirectional else 1
    for k in range(layers):
        ins = [3, 4] if k == 0 else [4, 2 * dirs]
        ih += [{"type": "linear", "format": "tt", "in_modes": ins, "out_modes": [8, 4], "bias": True,
                "ranks": [1, 3, 1]}] * dirs
    return {"type": "lstm", "input_size": 12, "hidden_size": 8, "num_layers": layers,
            "bidirectional": bidirectional, "batch_first": batch_first, "bias": True, "ih": ih}


def tensorized_lstm(recurrence: str | None, bidirectional: bool, layers: int,
                    batch_first: bool) -> TensorizedLSTM:
    spec = small_lstm_spec(bidirectional, layers, batch_first)
    torch.manual_seed(0)
    m = build_layer(spec).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, dtype=p.dtype) * 0.5)
    if recurrence is not None:  # None: the default a built model gets
        m.recurrence = recurrence
    return m


@pytest.mark.parametrize("bidirectional,layers,batch_first", [(False, 1, True), (True, 2, True),
                                                              (True, 2, False)])
def test_fused_training_path_equals_the_step_loop(bidirectional, layers, batch_first):
    """Same outputs and the same gradients for every parameter (cores, W_hh, biases)."""
    fused = tensorized_lstm("fused", bidirectional, layers, batch_first)
    loop = copy.deepcopy(fused)
    loop.recurrence = "loop"
    x = torch.randn((4, 6, 12) if batch_first else (6, 4, 12), dtype=torch.float64)
    outs = []
    for m in (fused, loop):
        out, (h, c) = m(x)
        (out.square().sum() + h.sum() + c.sum()).backward()
        outs.append((out, h, c))
    for a, b in zip(*outs, strict=True):
        assert rel(a, b) <= 1e-10
    for (n, p), q in zip(fused.named_parameters(), loop.parameters(), strict=True):
        assert rel(p.grad, q.grad) <= 1e-9, n


def test_fused_path_is_one_autograd_node_not_a_graph_per_step():
    """The point of the fused path: in float32 on the CPU the recurrence is one oneDNN LSTM
    call (its backward one node), not ~10 autograd nodes per time step."""

    def graph_size(m: nn.Module, steps: int) -> int:
        out, _ = m(torch.randn(2, steps, 12))
        seen, todo = set(), [out.grad_fn]
        while todo:
            f = todo.pop()
            if f is None or f in seen:
                continue
            seen.add(f)
            todo += [g for g, _ in f.next_functions]
        return len(seen)

    m = tensorized_lstm(None, False, 1, True).float()
    assert m.recurrence == "auto" and m.fused()  # 12 inputs <= 4 x 8 hidden: auto fuses
    assert graph_size(m, 40) == graph_size(m, 5)  # independent of the sequence length
    m.recurrence = "loop"
    assert graph_size(m, 40) > graph_size(m, 5) + 100


def test_auto_recurrence_rule():
    m = tensorized_lstm("auto", False, 1, True)
    assert m.fused()
    m.hidden_size = 2  # 12 inputs > 4 x 2: the dense W_ih would dwarf W_hh, keep the chain
    assert not m.fused()
    m.recurrence = "sometimes"
    with pytest.raises(ValueError, match="recurrence"):
        m.fused()


# ---------------------------------------------------------------------------- export
def test_lstm_onnx_is_one_lstm_op_and_its_sparse_file_stores_w_hh_sparse(tmp_path):
    """The tensorized LSTM exports as ONNX's LSTM op (not a graph unrolled per step), and
    ``model.sparse.onnx`` holds the pruned hidden-to-hidden matrix as a sparse initializer:
    no dense (4H, H) initializer is left."""
    import onnx
    from onnx import numpy_helper

    from tedepr_cli.export import ExportOptions, export

    art = lstm_artifact()
    h = art.model.lstm.hidden_size
    export(art, tmp_path / "e", ExportOptions(formats=["onnx", "onnx-sparse"]))
    dense, sparse = (onnx.load(str(tmp_path / "e" / f)) for f in ("model.onnx", "model.sparse.onnx"))
    assert [n.op_type for n in dense.graph.node].count("LSTM") == 1
    big = [i.name for i in sparse.graph.initializer if numpy_helper.to_array(i).size >= 4 * h * h]
    assert not big, big
    kept_hh = int(art.masks["lstm.weight_hh_l0"].sum())
    hh = [s for s in sparse.graph.sparse_initializer if list(s.dims)[-2:] == [4 * h, h]]  # R: (dirs, 4H, H)
    assert len(hh) == 1 and numpy_helper.to_array(hh[0].values).size <= kept_hh
    sizes = [(tmp_path / "e" / f).stat().st_size for f in ("model.sparse.onnx", "model.onnx")]
    # the dense R (4 B per entry) gave way to its kept entries (value + int64 index)
    assert sizes[0] <= sizes[1] - 4 * (4 * h * h) + 12 * kept_hh + 1024, sizes
