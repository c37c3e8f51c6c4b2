"""An LSTM whose hidden-to-hidden matrices are chains too (``lstm_hh="tensorized"``, issue 19):
the same function as ``nn.LSTM`` with the rebuilt weights (outputs and gradients, every
recurrence), pruned core entries stay zero through training, save/load, ONNX export and
the compiled inference recurrence on the rebuilt ``W_hh``. No timing assertions."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from tedepr_cli.arch import build, parse_arch
from tedepr_cli.artifact import Artifact, load_artifact, save_artifact
from tedepr_cli.decompose import DecomposeOptions, decompose
from tedepr_cli.errors import UsageError
from tedepr_cli.kernels.build import load_lstm
from tedepr_cli.masks import folded_copy, plain_named_parameters
from tedepr_cli.pruning.prune import PruneOptions, prune
from tedepr_cli.pruning.targets import kept_counts, prunable_groups
from tedepr_cli.tensorized.layers import build_layer, to_dense_layer
from tedepr_cli.tensorized.plan import PlanOptions, plan_model
from tedepr_cli.tensorized.wrappers import TensorizedLSTM

from .conftest import MNIST, ZOO_CASES, run_cli


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def hh_spec(fmt: str, bidirectional: bool, layers: int, batch_first: bool) -> dict:
    """A small LSTM spec (input 12, hidden 8) with TT/TR input AND hidden-to-hidden chains."""
    dirs = 2 if bidirectional else 1
    ring = [2, 2, 2, 2, 2] if fmt == "tr" else [1, 3, 1]
    ih, hh = [], []
    for k in range(layers):
        ins = [3, 4] if k == 0 else [4, 2 * dirs]
        ih += [{"type": "linear", "format": fmt, "in_modes": ins, "out_modes": [8, 4], "bias": True,
                "ranks": ring}] * dirs
        hh += [{"type": "linear", "format": fmt, "in_modes": [2, 4], "out_modes": [8, 4], "bias": False,
                "ranks": ring}] * dirs
    return {"type": "lstm", "input_size": 12, "hidden_size": 8, "num_layers": layers,
            "bidirectional": bidirectional, "batch_first": batch_first, "bias": True, "ih": ih, "hh": hh}


def random_hh_lstm(fmt: str, bidirectional: bool, layers: int, batch_first: bool) -> TensorizedLSTM:
    torch.manual_seed(0)
    m = build_layer(hh_spec(fmt, bidirectional, layers, batch_first)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, dtype=p.dtype) * 0.5)
    return m


@pytest.mark.parametrize("recurrence", ["fused", "loop", "auto"])
@pytest.mark.parametrize("fmt,bidirectional,layers,batch_first", [
    ("tt", False, 1, True), ("tt", True, 2, False), ("tr", True, 2, True)])
def test_chain_w_hh_lstm_equals_nn_lstm_with_the_rebuilt_weights(fmt, bidirectional, layers, batch_first,
                                                                   recurrence):
    """Outputs equal ``nn.LSTM`` holding the rebuilt weights; each core's gradient is the
    reference LSTM's gradient of its ``W_hh`` carried back through the rebuild."""
    m = random_hh_lstm(fmt, bidirectional, layers, batch_first)
    m.recurrence = recurrence
    assert m.hh_tensorized and not any(n.startswith("weight_hh") for n, _ in m.named_parameters())
    ref = to_dense_layer(m)
    assert isinstance(ref, nn.LSTM)
    x = torch.randn((4, 6, 12) if batch_first else (6, 4, 12), dtype=torch.float64)
    dirs = 2 if bidirectional else 1
    hx = tuple(torch.randn(layers * dirs, 4, 8, dtype=torch.float64) for _ in range(2))
    outs = []
    for mod in (m, ref):
        out, (h, c) = mod(x, hx)
        (out.square().sum() + h.sum() + c.square().sum()).backward()
        outs.append((out, h, c))
    for a, b in zip(*outs, strict=True):
        assert rel(a, b) <= 1e-10
    for idx, sfx in enumerate(m._suffixes()):
        g_ref = getattr(ref, f"weight_hh_{sfx}").grad  # dL/dW_hh of the reference
        cores = [c.detach().clone().requires_grad_() for c in m.hh[idx].cores]
        from tedepr_cli.tensorized.chain import ring_dense, tt_matrix_dense

        hh = m.hh[idx]
        w = tt_matrix_dense(cores) if fmt == "tt" else ring_dense(cores[: hh.n_in], cores[hh.n_in:])
        assert rel(w, getattr(ref, f"weight_hh_{sfx}")) <= 1e-12
        (w * g_ref).sum().backward()
        for core, mine in zip(cores, hh.cores, strict=True):
            assert rel(mine.grad, core.grad) <= 1e-9
        assert rel(getattr(m, f"bias_hh_{sfx}").grad, getattr(ref, f"bias_hh_{sfx}").grad) <= 1e-9
        assert rel(m.ih[idx].bias.grad, getattr(ref, f"bias_ih_{sfx}").grad) <= 1e-9


def test_weight_hh_reads_the_chain_under_nn_lstm_names():
    m = random_hh_lstm("tt", True, 1, True)
    assert not m.runs_kernel(torch.randn(2, 3, 12, dtype=torch.float64).requires_grad_())
    assert m.hh_density() is None  # no dense mask: "auto" trains on the fused LSTM
    for idx, sfx in enumerate(m._suffixes()):
        assert torch.equal(getattr(m, f"weight_hh_{sfx}"), m.hh[idx].dense_weight())
    with pytest.raises(AttributeError):
        m.weight_hh_l7  # noqa: B018
    assert build_layer(m.spec()).spec() == m.spec()


def test_malformed_hh_spec_is_refused():
    spec = hh_spec("tt", False, 1, True)
    with pytest.raises(Exception, match="hidden-to-hidden"):
        build_layer({**spec, "hh": spec["hh"] * 2})
    bad = copy.deepcopy(spec)
    bad["hh"][0]["in_modes"] = [3, 4]  # 12 -> 32: not H -> 4H
    with pytest.raises(Exception, match="hidden-to-hidden"):
        build_layer(bad)


# ---------------------------------------------------------------------------- plan, prune, train
def zoo_lstm() -> Artifact:
    torch.manual_seed(0)
    spec = parse_arch("lstm", json.dumps(ZOO_CASES["lstm"]))
    return Artifact(model=build(spec).eval(), arch=spec)


def test_plan_tensorizes_w_hh_and_counts_it():
    art = zoo_lstm()
    h = art.model.lstm.hidden_size
    plans = [{p.name: p for p in plan_model(art.model, art.input_shape, PlanOptions(rank=2, lstm_hh=hh))}
             for hh in ("dense", "tensorized")]
    plain, both = (p["lstm"] for p in plans)
    assert "hh" not in plain.spec and len(both.spec["hh"]) == 1
    hh = both.spec["hh"][0]
    assert (hh["bias"], hh["chain"], hh["out_modes"][0] % 4) == (False, "linear", 0)  # gates folded in
    assert both.dense_params == plain.dense_params + 4 * h * h  # W_hh is replaced too
    assert both.params > plain.params
    with pytest.raises(UsageError, match="lstm_hh"):
        PlanOptions(lstm_hh="sparse").validate()


@pytest.fixture(scope="module")
def pruned_hh() -> Artifact:
    out, rep = prune(zoo_lstm(), PruneOptions(sparsity=0.95, criterion="tedepr", seed=0),
                     MNIST, DecomposeOptions(format="tt", rank=None, init="random", seed=0,
                                             lstm_hh="tensorized"))
    return out


def test_prune_masks_the_hh_cores_within_the_budget(pruned_hh):
    model = pruned_hh.model
    assert model.lstm.hh_tensorized
    groups = {g.name: g for g in prunable_groups(model)}
    assert "lstm.hh.0" in groups and not any("weight_hh" in n for n in groups)
    hh_masks = [n for n in pruned_hh.masks if n.startswith("lstm.hh.0.cores.")]
    assert len(hh_masks) == len(model.lstm.hh[0].cores)
    counts = kept_counts(model)
    dense = sum(g.dense_count for g in groups.values())
    assert counts["kept"] <= round(0.05 * dense) + 1
    assert sum(int(pruned_hh.masks[n].sum()) for n in hh_masks) > 0  # the criterion gave W_hh entries
    assert pruned_hh.meta["tensorization"]["lstm_hh"] == "tensorized"


def test_pruned_hh_core_entries_stay_zero_through_training(pruned_hh, tmp_path, monkeypatch):
    import tedepr_cli.train as train_mod
    from tedepr_cli.train import TrainOptions, finetune

    hh = [n for n in pruned_hh.masks if n.startswith("lstm.hh.")]
    assert hh
    live = []  # the model being trained, checked in memory at every epoch end (before any save,
    # whose compact storage would re-zero pruned entries and hide a broken mask mechanism)
    snapshot = train_mod._artifact

    def spy(src, model, *args, **kwargs):
        stored = plain_named_parameters(model)
        live.append(all(torch.count_nonzero(stored[n].detach()[~pruned_hh.masks[n]]) == 0 for n in hh))
        return snapshot(src, model, *args, **kwargs)

    monkeypatch.setattr(train_mod, "_artifact", spy)
    before = {n: t.detach().clone() for n, t in plain_named_parameters(pruned_hh.model).items()}
    best, _ = finetune(pruned_hh, MNIST, tmp_path / "run",
                       TrainOptions(epochs=1, batch_size=64, limit_train=256, lr=1e-2, seed=1))
    assert live and all(live)
    params = plain_named_parameters(best.model)
    for n in hh:
        m = pruned_hh.masks[n]
        assert torch.equal(best.masks[n], m)
        assert torch.count_nonzero(params[n].detach()[~m]) == 0
    assert any(not torch.equal(params[n], before[n]) for n in hh)  # the hh cores trained
    w = best.model.lstm.weight_hh(0).detach()
    ref = folded_copy(best.model).lstm.hh[0].dense_weight().detach()
    assert torch.equal(w, ref)  # the forward's W_hh is the masked chain's


def test_save_load_round_trip(pruned_hh, tmp_path):
    save_artifact(pruned_hh, tmp_path / "a")
    back = load_artifact(tmp_path / "a")
    assert back.model.lstm.hh_tensorized
    assert back.model.lstm.spec() == pruned_hh.model.lstm.spec()
    assert set(back.masks) == set(pruned_hh.masks)
    for n, m in pruned_hh.masks.items():
        assert torch.equal(back.masks[n], m)
    x = torch.rand(3, *pruned_hh.input_shape)
    with torch.no_grad():
        assert torch.allclose(back.model.eval()(x), pruned_hh.model.eval()(x), atol=1e-6)


def test_onnx_export_validates(pruned_hh, tmp_path):
    import onnx

    from tedepr_cli.export import ExportOptions, export

    # raises ValidationError on mismatch; onnx-fast traces a copy whose W_hh chains are nn.Linear
    rep = export(pruned_hh, tmp_path / "e", ExportOptions(formats=["onnx", "onnx-fast"]))
    graph = onnx.load(str(tmp_path / "e" / "model.onnx")).graph
    assert [n.op_type for n in graph.node].count("LSTM") == 1
    assert all(c["ok"] for c in rep["validation"]["onnx-fast"].values()), rep["validation"]


@pytest.mark.skipif(load_lstm() is None, reason="compiled LSTM kernel unavailable")
def test_compiled_inference_recurrence_runs_on_the_rebuilt_w_hh(pruned_hh):
    from tedepr_cli.kernels.lstm import KernelLSTM

    model = folded_copy(pruned_hh.model).eval()
    kern = KernelLSTM(model.lstm, pruned_hh.masks, "lstm").eval()
    kern.lstm = None  # the C path must not fall back to the module
    w = model.lstm.weight_hh(0).detach()
    assert kern.kept_hh() == int(torch.count_nonzero(w))
    x = torch.rand(5, *pruned_hh.input_shape)
    with torch.no_grad():
        ref = copy.deepcopy(model.lstm).double()(x.double())
        got = kern(x)
    assert rel(got[0], ref[0]) <= 1e-5 and rel(got[1][0], ref[1][0]) <= 1e-5


def test_cli_flag(tmp_path):
    r = run_cli("decompose", "lstm", "-o", tmp_path / "d", "--init", "random", "--arch-kwargs",
                json.dumps(ZOO_CASES["lstm"]), "--rank", "2", "--lstm-hh", "tensorized")
    assert r.exit_code == 0, r.output
    assert load_artifact(tmp_path / "d").model.lstm.hh_tensorized
    # the plan shows the chain W_hh on its own line (H -> 4H), its cores counted in the LSTM's row
    hh_row = next(line for line in r.stdout.splitlines() if "lstm W_hh" in line)
    h = ZOO_CASES["lstm"].get("hidden", 128)
    assert f"{4 * h}x{h}" in hh_row and "counted in the row above" in hh_row
    lstm_row = next(line for line in r.stdout.splitlines() if line.startswith("│ lstm "))
    assert f"+ {4 * h}x{h}" in lstm_row  # the row's params cover W_ih and W_hh: its shape says both
    r = run_cli("decompose", "lstm", "-o", tmp_path / "e", "--init", "random", "--lstm-hh", "sparse")
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [
        "tedepr: usage error: --lstm-hh must be one of dense, tensorized, got 'sparse'"]
    assert not (tmp_path / "e").exists()
    assert "--lstm-hh" not in run_cli("decompose", "lstm", "-o", tmp_path / "f", "--init", "random",
                                      "--rank", "2", "--lstm-hh", "tensorized").stderr
    r = run_cli("decompose", "lenet300", "-o", tmp_path / "g", "--init", "random", "--rank", "2",
                "--lstm-hh", "tensorized")  # no LSTM: the option is said to do nothing, once
    assert r.exit_code == 0, r.output
    assert r.stderr.count("--lstm-hh tensorized has no effect: no LSTM is tensorized") == 1, r.stderr


def test_pretrained_init_decomposes_w_hh():
    """``init="pretrained"``: W_hh is the TT-SVD of the checkpoint's (closer with rank), and
    the report's error covers it."""
    art = zoo_lstm()
    dense = art.model.lstm.weight_hh_l0.detach()
    errs = []
    for r in (2, 8):
        out, rep = decompose(art, DecomposeOptions(rank=r, init="pretrained", lstm_hh="tensorized", modes=2,
                                                   include=["lstm"]))
        errs.append(rel(out.model.lstm.weight_hh(0), dense))
        assert rep[0]["rel_error"] >= errs[-1] - 1e-6
    assert errs[1] < errs[0] < 1.0


def test_reachability_follows_the_chain_w_hh():
    """Input reaches only unit u (one kept W_ih path), the head reads only unit v != u: cut
    while the W_hh chain keeps nothing, connected (one step later) once it keeps everything."""
    from tedepr_cli.pruning.reachability import reachability
    from tedepr_cli.tensorized.chain import tt_matrix_dense

    arch = parse_arch("lstm", json.dumps({"hidden": 8}))
    opts = DecomposeOptions(rank=1, init="random", lstm_hh="tensorized", include=["lstm"], modes=2)
    dec, _ = decompose(Artifact(model=build(arch).eval(), arch=arch), opts)
    model, h = dec.model, 8
    ih = [torch.zeros(c.shape, dtype=torch.bool) for c in model.lstm.ih[0].cores]
    ih[0].view(-1)[0] = ih[1].view(-1)[0] = True  # one path: one W_ih entry
    row = int(tt_matrix_dense([m.double() for m in ih]).nonzero()[0, 0])
    u = row % h
    v = (u + 1) % h
    fc = torch.zeros(model.fc.weight.shape, dtype=torch.bool)
    fc[:, v] = True
    masks = {"lstm.ih.0.cores.0": ih[0], "lstm.ih.0.cores.1": ih[1], "fc.weight": fc}
    hh = {f"lstm.hh.0.cores.{i}": torch.zeros(c.shape, dtype=torch.bool)
          for i, c in enumerate(model.lstm.hh[0].cores)}
    assert not reachability(model, dec.input_shape, {**masks, **hh}).connected
    full = {n: torch.ones_like(m) for n, m in hh.items()}
    assert reachability(model, dec.input_shape, {**masks, **full}).connected


@pytest.mark.skipif(load_lstm() is None, reason="compiled LSTM kernel unavailable")
def test_execution_planner_builds_the_chain_w_hh_lstm(pruned_hh, monkeypatch):
    """The planner plans the LSTM as one layer with all three choices; the compiled
    recurrence on the rebuilt W_hh, chosen, computes the artifact's function (the rebuilt
    nn.LSTM and the module are the tests above)."""
    from tedepr_cli import timing
    from tedepr_cli.execution import build_layers, options, plan_execution
    from tedepr_cli.kernels.lstm import KernelLSTM

    model = folded_copy(pruned_hh.model).eval()
    assert set(options("lstm", model.lstm, pruned_hh.masks, 1)) == {"torch", "dense", "kernel"}
    x = torch.rand(3, *pruned_hh.input_shape)
    with torch.no_grad():
        ref = copy.deepcopy(pruned_hh.model).double()(x.double())
    monkeypatch.setattr(timing, "medians", lambda fns, reps, warmup=2, clock=None:
                        {k: 1e-6 if k == "kernel" else 3e-6 for k in fns})
    plan = plan_execution(pruned_hh, 3, fuse=False)
    assert plan["layers"]["lstm"]["choice"] == "kernel"
    built = build_layers(pruned_hh, plan)
    assert isinstance(built.lstm, KernelLSTM)
    with torch.no_grad():
        assert rel(built(x), ref) <= 1e-5
