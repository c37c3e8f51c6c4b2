"""Training on the rebuilt dense weight (tensorized/train_path.py): the same function and
core gradients as the chain, inference untouched, the per-layer measured choice, and
finetune recording and resuming it."""

from __future__ import annotations

import pytest
import torch

from tedepr_cli import kernels
from tedepr_cli.arch import parse_arch
from tedepr_cli.loading import load_model
from tedepr_cli.masks import plain_named_parameters
from tedepr_cli.pruning.prune import PruneOptions, prune
from tedepr_cli.tensorized.plan import build_layer
from tedepr_cli.tensorized.train_path import measure, rebuildable, train_paths, uniform
from tedepr_cli.train import TrainOptions, finetune

from .conftest import LENET300, MNIST, run_cli

SPECS = {
    "tt-linear": {"type": "linear", "format": "tt", "in_modes": [4, 6], "out_modes": [5, 3],
                  "ranks": [1, 3, 1]},
    "tr-linear": {"type": "linear", "format": "tr", "in_modes": [4, 6], "out_modes": [5, 3],
                  "ranks": [2, 3, 2, 2, 2]},
    "tt-conv": {"type": "conv2d", "format": "tt", "in_modes": [2, 3], "out_modes": [2, 4],
                "ranks": [1, 2, 3, 3, 2, 1], "kernel_size": [3, 3], "stride": [2, 1], "padding": [1, 0]},
}


def _input(layer, batch=5):
    if layer.kind == "conv2d":
        return torch.randn(batch, layer.in_features, 9, 8)
    return torch.randn(batch, 7, layer.in_features)  # extra leading dims, like tokens


def _chain_and_rebuild(layer, x, params):
    """``layer``'s output on ``x`` and the gradients of ``params`` then of ``x`` (a fixed
    linear loss), on its chain and on its rebuilt weight, by path name."""
    grads, outs = {}, {}
    for path in ("chain", "dense"):
        layer.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_(True)
        with train_paths(layer, {"": path}):
            y = layer(xr)
            (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        outs[path] = y.detach()
        grads[path] = [c.grad.clone() for c in params] + [xr.grad.clone()]
    return outs, grads


@pytest.mark.parametrize("name", list(SPECS))
def test_the_rebuild_computes_the_chain_and_its_core_gradients(name):
    torch.manual_seed(0)
    layer = build_layer(SPECS[name])
    with torch.no_grad():
        for c in layer.cores:
            c.normal_()
        if layer.bias is not None:
            layer.bias.normal_()
    x = _input(layer)
    outs, grads = _chain_and_rebuild(layer, x, list(layer.cores))
    torch.testing.assert_close(outs["dense"], outs["chain"], rtol=1e-4, atol=1e-4)
    for a, b in zip(grads["dense"], grads["chain"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert layer.train_path == "chain"  # restored


def test_inference_keeps_the_chain_and_training_really_rebuilds(monkeypatch):
    layer = build_layer(SPECS["tt-linear"])
    calls = []
    real = type(layer).dense_weight
    monkeypatch.setattr(type(layer), "dense_weight", lambda self: calls.append(1) or real(self))
    x = _input(layer)
    with train_paths(layer, {"": "dense"}):
        with torch.no_grad():
            layer(x)
        assert not calls  # exports, kernels and eval run the chain
        layer(x)
        assert calls
    calls.clear()
    layer(x)  # outside the block: the chain again
    assert not calls


def _pruned_tt(in_modes, out_modes, ranks, prune):
    """A TT-matrix Linear with random cores and masks: ``prune(k, mask)`` clears entries of
    core ``k``'s all-True mask in place."""
    from tedepr_cli.masks import attach_masks

    torch.manual_seed(0)
    layer = build_layer({"type": "linear", "format": "tt", "in_modes": in_modes, "out_modes": out_modes,
                         "ranks": ranks})
    with torch.no_grad():
        for c in layer.cores:
            c.normal_()
        layer.bias.normal_()
    masks = {}
    for k, c in enumerate(layer.cores):
        m = torch.rand(c.shape) < 0.8
        prune(k, m)
        masks[f"cores.{k}"] = m
    attach_masks(layer, masks)
    return layer


def _gathered_rows_kept():
    """Input modes 1 and 3 of core 0 pruned, 0 and 4 of core 2 (4 * 3 * 3 of 8 * 3 * 5
    columns kept: the input is gathered), output mode 1 of core 1 (most rows kept: the block
    goes into zero rows), and rank index 2 of the first bond kept in core 0 but pruned in
    core 1 (a dead bond: the rank drops, with every entry of core 0 that only it used)."""
    def prune(k, m):
        m[...] = m | (torch.rand(m.shape) < 0.5)  # dense enough that no other slice empties
        if k == 0:
            m[:, [1, 3]] = False
        if k == 1:
            m[:, :, 1] = False
            m[2] = False
        if k == 2:
            m[:, [0, 4]] = False
    return _pruned_tt([8, 3, 5], [4, 6, 2], [1, 3, 2, 1], prune)


def _scattered_cols_kept():
    """15 of 20 columns kept (placed in zero columns), 2 of 6 * 6 output rows (scattered)."""
    def prune(k, m):
        m[...] = m | (torch.rand(m.shape) < 0.5)
        if k == 0:
            m[:, 0] = False
            m[:, :, [0, 2, 3, 4, 5]] = False
        if k == 1:
            m[:, :, [1, 2, 3, 5]] = False
    return _pruned_tt([4, 5], [6, 6], [1, 3, 1], prune)


@pytest.mark.parametrize("make", [_gathered_rows_kept, _scattered_cols_kept])
def test_a_pruned_rebuild_runs_on_the_kept_block_with_the_chains_outputs_and_gradients(make, monkeypatch):
    """The rebuild of a pruned TT-matrix forms only the block of W its masks can reach (the
    cores are cut to their kept slices before the rebuild) and computes the chain's function,
    input gradient and core gradients (pruned entries' gradients exactly zero)."""
    import tedepr_cli.tensorized.tt as tt

    layer = make()
    index, cols, rows = layer._kept_support()
    n, m = layer.in_features, layer.out_features
    assert 0 < cols.numel() < n and 0 < rows.numel() < m
    full = layer.dense_weight().detach()  # the dense weight of the masked cores
    keep = torch.zeros_like(full, dtype=torch.bool)
    keep[rows[:, None], cols] = True
    assert torch.all(full[~keep] == 0)  # nothing nonzero outside the block
    shapes = []
    real = tt.tt_matrix_dense
    monkeypatch.setattr(tt, "tt_matrix_dense", lambda cores: shapes.append(real(cores).shape) or real(cores))
    x = torch.randn(6, 4, n)
    outs, grads = _chain_and_rebuild(layer, x, list(plain_named_parameters(layer).values()))
    assert shapes == [(rows.numel(), cols.numel())]  # the rebuild formed the kept block only
    torch.testing.assert_close(outs["dense"], outs["chain"], rtol=1e-4, atol=1e-4)
    for a, b in zip(grads["dense"], grads["chain"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    from tedepr_cli.masks import get_masks

    for name, mask in get_masks(layer).items():
        g = plain_named_parameters(layer)[name].grad
        assert g is not None and torch.all(g[~mask] == 0)


def test_the_kept_block_follows_the_masks_when_they_change():
    """The support is cached per mask tensor and version: masks re-attached in place (a
    second pruning round) give the new block, not the old one."""
    from tedepr_cli.masks import attach_masks, get_masks

    layer = _scattered_cols_kept()
    _, _, rows = layer._kept_support()
    masks = {n: m.clone() for n, m in get_masks(layer).items()}
    masks["cores.1"][:, :, 4] = False  # one of the two kept output modes of core 1 goes
    attach_masks(layer, masks)
    _, _, fewer = layer._kept_support()
    assert fewer.numel() == rows.numel() // 2
    x = torch.randn(5, layer.in_features)
    with train_paths(layer, {"": "dense"}):
        y = layer(x)
    torch.testing.assert_close(y, layer(x), rtol=1e-4, atol=1e-4)  # == the chain, new masks


def test_measure_chooses_per_layer_and_leaves_the_model_as_it_was(monkeypatch):
    art = load_model(LENET300, parse_arch("lenet300"))
    art, _ = prune(art, PruneOptions(sparsity=0.99, criterion="synflow"))
    model = art.model.train()
    params = plain_named_parameters(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    x = torch.rand(16, *art.input_shape)
    got = measure(model, x, reps=2)
    assert set(got) == set(rebuildable(model)) == {"fc1", "fc2", "fc3"}
    for t in got.values():
        assert t["path"] in ("chain", "dense", "kernel") and t["chain_ms"] > 0 and t["dense_ms"] > 0
        best = "kernel" if t.get("kernel_ms", float("inf")) < t["chain_ms"] else "chain"
        assert (t["path"] == "dense") == (t["dense_ms"] < 0.9 * t[f"{best}_ms"])
        assert t["path"] == "dense" or t["path"] == best
    assert model.training and all(m.train_path == "chain" for m in rebuildable(model).values())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[n], p.detach()) for n, p in params.items())
    # the choice follows the timings: a rebuild made slow is never chosen
    import tedepr_cli.tensorized.train_path as tp

    monkeypatch.setattr(tp, "_step", lambda layer, x, path: 1.0 if path == "chain" else 5.0)
    assert {t["path"] for t in measure(model, x, reps=2).values()} == {"chain"}
    monkeypatch.setattr(tp, "_step", lambda layer, x, path: 1.0 if path == "dense" else 5.0)
    assert {t["path"] for t in measure(model, x, reps=2).values()} == {"dense"}
    if kernels.available():  # the compiled training chain is a third candidate where it runs
        monkeypatch.setattr(tp, "_step", lambda layer, x, path: 1.0 if path == "kernel" else 5.0)
        assert {t["path"] for t in measure(model, x, reps=2).values()} == {"kernel"}


@pytest.fixture(scope="module")
def pruned():
    art = load_model(LENET300, parse_arch("lenet300"))
    out, _ = prune(art, PruneOptions(sparsity=0.995, criterion="snip"), MNIST)
    return out


def test_finetune_auto_records_its_choice_and_a_resume_keeps_it(pruned, tmp_path, monkeypatch):
    import tedepr_cli.tensorized.train_path as tp

    monkeypatch.setattr(tp, "measure", lambda model, x, **kw: {
        n: {"path": "dense" if n == "fc2" else "chain", "chain_ms": 1.0,
            "dense_ms": 0.5 if n == "fc2" else 2.0} for n in rebuildable(model)})
    opts = TrainOptions(epochs=2, batch_size=64, limit_train=256, lr=3e-3, seed=1, train_path="auto")
    stop = {"after": 1}

    class Stop(Exception):
        pass

    def on_epoch(epoch, metrics):
        if epoch == stop["after"]:
            raise Stop

    with pytest.raises(Stop):
        finetune(pruned, MNIST, tmp_path / "run", opts, on_epoch=on_epoch)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert state["train_paths"] == {"fc1": "chain", "fc2": "dense", "fc3": "chain"}

    def no_measure(*a, **kw):
        raise AssertionError("a resumed run must keep its recorded choice")

    monkeypatch.setattr(tp, "measure", no_measure)
    stop["after"] = 0
    _, summary = finetune(pruned, MNIST, tmp_path / "run", opts, resume=True, on_epoch=on_epoch)
    assert {n: t["path"] for n, t in summary["train_paths"].items()} == {"fc1": "chain", "fc2": "dense",
                                                                         "fc3": "chain"}


def test_uniform_paths_and_the_option(pruned, tmp_path):
    assert uniform(pruned.model, "dense") == {"fc1": "dense", "fc2": "dense", "fc3": "dense"}
    _, summary = finetune(pruned, MNIST, tmp_path / "d", TrainOptions(
        epochs=1, batch_size=64, limit_train=128, lr=3e-3, train_path="dense"))
    assert summary["train_paths"] == {n: {"path": "dense"} for n in ("fc1", "fc2", "fc3")}
    r = run_cli("finetune", LENET300, "--arch", "lenet300", "--data", MNIST, "--train-path", "fast",
                "-o", tmp_path / "x")
    assert r.exit_code == 2 and "--train-path" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_the_default_path_trains_linear_layers_on_the_lighter_path(pruned, tmp_path):
    """finetune's default (--train-path lighter): per Linear the path whose backward keeps
    fewer bytes on a training batch (sizes of a seeded batch: the same choice every run)."""
    from tedepr_cli.surgery import example_input
    from tedepr_cli.tensorized.train_path import leaner, lighter

    assert TrainOptions().train_path == "lighter"
    _, summary = finetune(pruned, MNIST, tmp_path / "l", TrainOptions(
        epochs=1, batch_size=64, limit_train=128, lr=3e-3, seed=2))
    x = example_input(pruned.model, pruned.input_shape, 64, "rand", torch.Generator().manual_seed(2))
    sizes = lighter(pruned.model, lambda: pruned.model(x))
    # every TT Linear on the compiled training chain where it runs, else the lighter of the two
    want = {n: "kernel" if kernels.available() else t["path"] for n, t in sizes.items()}
    assert {n: t["path"] for n, t in summary["train_paths"].items()} == want == leaner(pruned.model, x)
    # by bytes, the wide first layer keeps its chain (what runs where the kernel cannot)
    assert {t["path"] for t in sizes.values()} == {"chain", "dense"}


def test_lighter_keeps_convolutions_on_their_chain(monkeypatch):
    """A convolution's rebuild is a full dense convolution (compute, not memory, bound):
    the lighter path keeps every conv chain even where the rebuild keeps fewer bytes."""
    import tedepr_cli as tedepr
    import tedepr_cli.tensorized.train_path as tp

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.Flatten(),
                            torch.nn.Linear(16 * 6 * 6, 24))
    model = tedepr.tensorize(m, example_input=torch.rand(2, 8, 6, 6), rank=2)
    assert set(rebuildable(model)) == {"0", "2"}
    monkeypatch.setattr(tp, "lighter", lambda model, run: {
        n: {"path": "dense", "chain_bytes": 2, "dense_bytes": 1} for n in rebuildable(model)})
    monkeypatch.setattr(tp, "kernel_runs", lambda layer, x: True)  # even where it runs: no conv kernel
    assert tp.leaner(model, torch.rand(4, 8, 6, 6)) == {"0": "chain", "2": "kernel"}
    monkeypatch.setattr(tp, "kernel_runs", lambda layer, x: False)
    assert tp.leaner(model, torch.rand(4, 8, 6, 6)) == {"0": "chain", "2": "dense"}


# ---------------------------------------------------------------------------- scoring memory
def _encoder_like():
    """Token-like rows through a wide TT pair (many rows, rank 8: the chain's intermediates
    outweigh the dense layer's input and output), then a small head."""
    import tedepr_cli as tedepr

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(384, 1536), torch.nn.GELU(), torch.nn.Linear(1536, 10))
    return tedepr.tensorize(m, example_input=torch.rand(2, 16, 384), rank=8)


def test_lighter_picks_the_path_that_keeps_fewer_bytes():
    from tedepr_cli.tensorized.train_path import lighter

    wide = _encoder_like()
    x = torch.rand(32, 16, 384)
    got = lighter(wide, lambda: wide(x))
    assert got["0"]["path"] == "dense" and got["0"]["chain_bytes"] > 3 * got["0"]["dense_bytes"]
    m = torch.nn.Sequential(torch.nn.Linear(784, 300), torch.nn.ReLU(), torch.nn.Linear(300, 10))
    import tedepr_cli as tedepr

    narrow = tedepr.tensorize(m, example_input=torch.rand(2, 784), rank=4)
    got = lighter(narrow, lambda: narrow(torch.rand(4, 784)))  # 4 rows: the dense weight dominates
    assert {t["path"] for t in got.values()} == {"chain"}
    for t in got.values():
        assert (t["path"] == "dense") == (t["dense_bytes"] < t["chain_bytes"])


def test_data_driven_scoring_runs_on_the_lighter_path(monkeypatch):
    """prune with data scores the wide layer on its rebuilt weight (its dense_weight is built
    while the criterion differentiates) and reports it; the masks are what the chain gives."""
    from tedepr_cli.pruning.prune import PruneOptions, prune_model
    from tedepr_cli.tensorized.tt import TTLinear

    model = _encoder_like()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(16, 16, 384, generator=g), torch.randint(0, 10, (16,), generator=g))
               for _ in range(4)]

    def pooled(m):  # a classifier over the mean of the rows
        class Pool(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.body = m

            def forward(self, x):
                return self.body(x).mean(dim=1)
        return Pool()

    rebuilt = []  # per forward of a TT layer while the criterion scores: on the rebuild?
    scoring = []
    real = TTLinear.forward

    def spy(self, x):
        if scoring:
            rebuilt.append(self.training_on_rebuild())
        return real(self, x)

    monkeypatch.setattr(TTLinear, "forward", spy)
    import dataclasses

    import tedepr_cli.pruning.prune as pm

    snip = pm.CRITERIA.get("snip")

    def scored(ctx):
        scoring.append(1)
        try:
            return snip.fn(ctx)
        finally:
            scoring.clear()

    monkeypatch.setattr(pm.CRITERIA, "get", lambda name: dataclasses.replace(snip, fn=scored))
    a = pooled(model)
    rep = prune_model(a, PruneOptions(sparsity=0.995, criterion="snip"), batches, (16, 384))
    assert rep["scored_on_rebuild"] == ["body.0", "body.2"] and rebuilt and all(rebuilt)

    monkeypatch.setattr(pm, "lighter", lambda model, run: {})  # the chain everywhere
    b = pooled(_encoder_like())
    rep_b = prune_model(b, PruneOptions(sparsity=0.995, criterion="snip"), batches, (16, 384))
    assert rep_b["scored_on_rebuild"] == []
    from tedepr_cli.masks import get_masks

    ma, mb = get_masks(a), get_masks(b)
    agree = sum(int((ma[n] == mb[n]).sum()) for n in ma) / sum(m.numel() for m in ma.values())
    assert agree > 0.99  # the same scores up to float rounding
