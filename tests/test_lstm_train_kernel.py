"""The compiled LSTM training recurrence (issue 17 item 4): ``kernels/lstm.c``'s forward and
backward through time, through :mod:`tedepr_cli.kernels.lstm_train` and the tensorized LSTM's
``"kernel"`` recurrence, against torch in float64 (outputs and every gradient), the choice of
``"auto"``, double backward (the pruning criteria), and a finetune of the zoo LSTM on the
MNIST sample. No timing assertions."""

from __future__ import annotations

import copy

import pytest
import torch

from tedepr_cli import masks as masks_mod
from tedepr_cli.arch import ArchSpec
from tedepr_cli.artifact import Artifact
from tedepr_cli.kernels import lstm_train
from tedepr_cli.kernels.build import load_lstm
from tedepr_cli.masks import attach_masks, plain_named_parameters
from tedepr_cli.pruning.prune import PruneOptions, prune
from tedepr_cli.tensorized.layers import build_layer
from tedepr_cli.tensorized.wrappers import KERNEL_MAX_DENSITY, TensorizedLSTM

from .conftest import MNIST
from .test_lstm import small_lstm_spec

TOL = 1e-5
pytestmark = pytest.mark.skipif(load_lstm() is None, reason="compiled LSTM kernel unavailable")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


# ---------------------------------------------------------------------------- one layer, one direction
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("state,bias,batch", [(True, True, 5), (False, False, 3), (True, True, 1)])
def test_recurrence_and_every_gradient_equal_torch_in_float64(reverse, state, bias, batch):
    """Outputs h_t, h_T, c_T and the gradients wrt gx, the kept W_hh entries, b_hh, h0 and
    c0, from random upstream gradients on all three outputs, within 1e-5 relative of
    float64 torch; the gradient of the dense W_hh is exactly zero at pruned entries."""
    g = torch.Generator().manual_seed(1)
    steps, hidden = 7, 8
    mask = torch.rand(4 * hidden, hidden, generator=g) < 0.3
    ref = {"gx": torch.randn(batch, steps, 4 * hidden, generator=g, dtype=torch.float64),
           "w": torch.randn(4 * hidden, hidden, generator=g, dtype=torch.float64) * 0.6 * mask,
           "b": torch.randn(4 * hidden, generator=g, dtype=torch.float64) if bias else None,
           "h0": torch.randn(batch, hidden, generator=g, dtype=torch.float64) if state else None,
           "c0": torch.randn(batch, hidden, generator=g, dtype=torch.float64) if state else None}
    ref = {k: None if v is None else v.requires_grad_() for k, v in ref.items()}
    got = {k: None if v is None else v.detach().float().requires_grad_() for k, v in ref.items()}
    pattern = lstm_train.KeptPattern.of(mask, tuple(mask.shape))
    assert pattern.nnz == int(mask.sum())
    out_ref = lstm_train.torch_recurrence(ref["gx"], ref["w"], ref["b"], ref["h0"], ref["c0"], reverse)
    out_got = lstm_train.recurrence(got["gx"], got["w"].reshape(-1)[pattern.flat], got["b"], got["h0"],
                                    got["c0"], pattern, reverse)
    ups = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in out_ref]
    sum((o * u).sum() for o, u in zip(out_ref, ups, strict=True)).backward()
    sum((o * u.float()).sum() for o, u in zip(out_got, ups, strict=True)).backward()
    for a, b in zip(out_got, out_ref, strict=True):
        assert rel(a, b) <= TOL
    for k in ref:
        if ref[k] is None:
            continue
        if k == "w":
            assert rel(got["w"].grad[mask], ref["w"].grad[mask]) <= TOL
            assert torch.count_nonzero(got["w"].grad[~mask]) == 0
        else:
            assert rel(got[k].grad, ref[k].grad) <= TOL, k


def test_backward_takes_only_the_kept_entries():
    """The kernel's W_hh gradient is one value per kept entry (CSR order): it never
    addresses a pruned one. The dense gradient it lands in is zero at every pruned entry
    although the loss depends on them (torch's dense gradient is not)."""
    g = torch.Generator().manual_seed(2)
    hidden = 6
    mask = torch.rand(4 * hidden, hidden, generator=g) < 0.25
    w = (torch.randn(4 * hidden, hidden, generator=g) * mask).requires_grad_()
    gx = torch.randn(3, 5, 4 * hidden, generator=g)
    pattern = lstm_train.KeptPattern.of(mask, tuple(mask.shape))
    vals = w.reshape(-1)[pattern.flat]
    out, _, _ = lstm_train.recurrence(gx, vals, None, None, None, pattern)
    (dvals,) = torch.autograd.grad(out.square().sum(), [vals], retain_graph=True)
    assert dvals.shape == (int(mask.sum()),)
    out.square().sum().backward()
    assert torch.count_nonzero(w.grad[~mask]) == 0
    dense = w.detach().clone().requires_grad_()
    lstm_train.torch_recurrence(gx, dense, None, None, None, False)[0].square().sum().backward()
    assert torch.count_nonzero(dense.grad[~mask]) > 0  # the pruned entries do matter to torch


# ---------------------------------------------------------------------------- the tensorized LSTM
def masked_lstm(bidirectional: bool, layers: int, batch_first: bool, density: float = 0.06,
                seed: int = 0) -> TensorizedLSTM:
    """A float64 tensorized LSTM (TT input projections) with every W_hh masked at ``density``."""
    spec = small_lstm_spec(bidirectional, layers, batch_first)
    g = torch.Generator().manual_seed(seed)
    m = build_layer(spec).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    kept = round(density * 32 * 8)  # exactly: the auto rule compares the kept fraction
    attach_masks(m, {f"weight_hh_{s}": torch.zeros(32 * 8, dtype=torch.bool).index_fill(
        0, torch.randperm(32 * 8, generator=g)[:kept], True).reshape(32, 8) for s in m._suffixes()})
    return m


@pytest.mark.parametrize("bidirectional,layers,batch_first", [(False, 1, True), (True, 2, True),
                                                              (True, 2, False), (False, 2, False)])
def test_kernel_recurrence_equals_fused_in_float64_with_every_gradient(bidirectional, layers, batch_first):
    """float32 on the compiled recurrence vs float64 on torch's fused LSTM: outputs, h_n,
    c_n and the gradient of every parameter (input-projection cores and biases via the
    chain, W_hh through its mask, b_hh), of the input and of h0, c0, within 1e-5 relative."""
    ref = masked_lstm(bidirectional, layers, batch_first)
    kern = copy.deepcopy(ref).float()
    ref.recurrence = "fused"
    assert kern.recurrence == "auto"
    g = torch.Generator().manual_seed(3)
    dirs = 2 if bidirectional else 1
    shape = (4, 6, 12) if batch_first else (6, 4, 12)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    hx = tuple(torch.randn(layers * dirs, 4, 8, generator=g, dtype=torch.float64) for _ in range(2))
    ins_ref = [t.clone().requires_grad_() for t in (x, *hx)]
    ins_got = [t.float().requires_grad_() for t in (x, *hx)]
    assert kern.runs_kernel(ins_got[0], tuple(ins_got[1:]))  # auto, training, W_hh masked to ~6 %
    outs = []
    for m, (xi, h0, c0) in ((ref, ins_ref), (kern, ins_got)):
        out, (h, c) = m(xi, (h0, c0))
        (out.square().sum() + (h * 0.7).sum() + (c * 1.3).sum()).backward()
        outs.append((out, h, c))
    for a, b in zip(outs[1], outs[0], strict=True):
        assert rel(a, b) <= TOL
    for a, b in zip(ins_got, ins_ref, strict=True):
        assert rel(a.grad, b.grad) <= TOL
    pk, pr = plain_named_parameters(kern), plain_named_parameters(ref)
    assert set(pk) == set(pr) and any(n.startswith("ih.") for n in pk)
    for n in pr:
        assert rel(pk[n].grad, pr[n].grad) <= TOL, n
        mask = masks_mod.get_masks(kern).get(n)
        if mask is not None:
            assert torch.count_nonzero(pk[n].grad[~mask]) == 0


def test_kernel_pattern_is_the_mask():
    m = masked_lstm(True, 2, True).float()
    for s in m._suffixes():
        mask = masks_mod.mask_of(m, f"weight_hh_{s}")
        pattern = m._pattern(s)
        assert pattern.nnz == int(mask.sum())
        assert torch.equal(mask.reshape(-1).nonzero().reshape(-1), pattern.flat)
    attach_masks(m, {"weight_hh_l0": torch.zeros(32, 8, dtype=torch.bool)})  # a new mask: re-read
    assert m._pattern("l0").nnz == 0


def test_auto_takes_the_kernel_only_in_training_on_a_sparse_masked_w_hh():
    m = masked_lstm(False, 1, True).float()
    x = torch.randn(2, 5, 12)
    assert m.runs_kernel(x)
    with torch.no_grad():  # inference keeps torch's fused LSTM (the planner has KernelLSTM)
        assert not m.runs_kernel(x)
    for p in m.parameters():
        p.requires_grad_(False)
    assert not m.runs_kernel(x)  # autograd records nothing
    assert m.runs_kernel(x.requires_grad_())
    denser = masked_lstm(False, 1, True, density=0.3).float()
    assert denser.hh_density() > KERNEL_MAX_DENSITY
    assert not denser.runs_kernel(x)  # above KERNEL_MAX_DENSITY torch's GEMMs are faster
    unmasked = masked_lstm(False, 1, True).float()
    masks_mod.remove_masks(unmasked)
    assert not unmasked.runs_kernel(x)
    assert not masked_lstm(False, 1, True).runs_kernel(x.double())  # float64: torch's path
    m.recurrence = "fused"
    assert not m.runs_kernel(x)
    m.recurrence = "kernel"
    with torch.no_grad():
        assert m.runs_kernel(x)
    m.recurrence = "often"
    with pytest.raises(ValueError, match="recurrence"):
        m.runs_kernel(x)


def test_explicit_kernel_falls_back_where_it_cannot_run_and_takes_an_unmasked_w_hh():
    """``"kernel"`` on float64 runs torch's path (same result as fused); on an unmasked
    W_hh it keeps every entry (the whole gradient)."""
    ref = masked_lstm(False, 1, True)
    ref.recurrence = "fused"
    m = copy.deepcopy(ref)
    m.recurrence = "kernel"
    x = torch.randn(3, 4, 12, dtype=torch.float64)
    assert not m.runs_kernel(x)
    assert rel(m(x)[0], ref(x)[0]) <= 1e-12
    masks_mod.remove_masks(ref)
    masks_mod.remove_masks(m)
    ref, m = ref.float(), m.float()
    assert m.runs_kernel(x.float()) and m._pattern("l0").nnz == 32 * 8
    for mod in (ref, m):
        mod(x.float())[0].sum().backward()
    assert rel(m.weight_hh_l0.grad, ref.weight_hh_l0.grad) <= TOL


def test_double_backward_through_the_kernel_equals_torch():
    """The GraSP / tedepr criteria's Hessian-vector product (create_graph=True): the kernel
    path's backward recomputes in torch ops, so H v equals the fused path's."""
    ref = masked_lstm(False, 1, True).float()
    kern = copy.deepcopy(ref)
    ref.recurrence = "fused"
    x = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(4))
    assert kern.runs_kernel(x)
    hvs = []
    for m in (ref, kern):
        params = list(m.parameters())
        loss = m(x)[0].square().sum()
        gs = torch.autograd.grad(loss, params, create_graph=True)
        vec = [torch.ones_like(p) for p in params]
        hvs.append(torch.autograd.grad(sum((g * v).sum() for g, v in zip(gs, vec, strict=True)), params))
    for a, b in zip(*hvs, strict=True):
        assert rel(a, b) <= 1e-4


# ---------------------------------------------------------------------------- finetune
@pytest.fixture(scope="module")
def pruned_zoo_lstm():
    from tedepr_cli import zoo

    torch.manual_seed(0)
    model = zoo.lstm(hidden=32).eval()
    art, _ = prune(Artifact(model=model, arch=ArchSpec("lstm", {"hidden": 32})),
                   PruneOptions(sparsity=0.99, criterion="magnitude", seed=0))
    return art


def test_finetune_of_the_zoo_lstm_same_losses_on_both_recurrences_and_masks_stay_zero(
        pruned_zoo_lstm, tmp_path, monkeypatch):
    import tedepr_cli.train as train_mod
    from tedepr_cli.train import TrainOptions, finetune

    art = pruned_zoo_lstm
    assert isinstance(art.model.lstm, TensorizedLSTM)
    density = art.model.lstm.hh_density()
    assert density is not None and density <= KERNEL_MAX_DENSITY
    calls = []
    real = lstm_train.recurrence
    monkeypatch.setattr(lstm_train, "recurrence", lambda *a, **k: calls.append(1) or real(*a, **k))
    live = []  # in memory at every epoch end, before the compact save re-zeroes anything
    snapshot = train_mod._artifact

    def spy(src, model, *args, **kwargs):
        stored = plain_named_parameters(model)
        live.append(all(torch.count_nonzero(stored[n].detach()[~m]) == 0 for n, m in art.masks.items()))
        return snapshot(src, model, *args, **kwargs)

    monkeypatch.setattr(train_mod, "_artifact", spy)
    losses = {}
    for rec in ("fused", "auto"):
        src = copy.deepcopy(art)
        src.model.lstm.recurrence = rec
        losses[rec] = seen = []
        calls.clear()
        opts = TrainOptions(epochs=2, batch_size=32, limit_train=128, lr=3e-3, seed=5)
        best, _ = finetune(src, MNIST, tmp_path / rec, opts, on_batch=lambda e, b, s, loss, seen=seen:
                           seen.append(loss))
        assert bool(calls) == (rec == "auto")  # the kernel ran on auto, never on fused
        params = plain_named_parameters(best.model)
        for n, m in art.masks.items():
            assert torch.count_nonzero(params[n].detach()[~m]) == 0
    assert live and all(live)
    assert len(losses["auto"]) == len(losses["fused"]) == 8
    for a, b in zip(losses["auto"], losses["fused"], strict=True):
        assert a == pytest.approx(b, rel=1e-4)
    assert losses["auto"][0] != losses["auto"][-1]  # it trained


def test_loop_recurrence_still_equals_fused():
    """The step loop now calls :func:`lstm_train.torch_recurrence` (one place for it)."""
    ref = masked_lstm(True, 2, False)
    ref.recurrence = "fused"
    loop = copy.deepcopy(ref)
    loop.recurrence = "loop"
    x = torch.randn(5, 3, 12, dtype=torch.float64)
    for m in (ref, loop):
        out, (h, c) = m(x)
        (out.sum() + h.sum() + c.sum()).backward()
    for (n, p), q in zip(ref.named_parameters(), loop.parameters(), strict=True):
        assert rel(q.grad, p.grad) <= 1e-9, n



def test_autocast_and_bad_tensors_keep_off_the_kernel():
    m = masked_lstm(False, 1, True).float()
    x = torch.randn(2, 5, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not m.runs_kernel(x)
    pattern = lstm_train.KeptPattern.of(None, (8, 2))
    with pytest.raises(ValueError, match="float32"):
        lstm_train.recurrence(torch.zeros(1, 3, 8, dtype=torch.float64), torch.zeros(16), None, None, None,
                              pattern)
    with pytest.raises(ValueError, match="shapes"):
        lstm_train.recurrence(torch.zeros(1, 3, 8), torch.zeros(15), None, None, None, pattern)
