"""The compiled training chain (kernels/chain.c ABI 4, tedepr_cli/kernels/chain_train.py):
outputs and every gradient equal the float64 torch chain, pruned entries stay zero through
optimizer steps, finetune follows the chain's loss trajectory, and the torch chain runs
wherever the kernel cannot (no library, other dtypes, double backward)."""

from __future__ import annotations

import copy

import pytest
import torch

from tedepr_cli import kernels
from tedepr_cli.arch import parse_arch
from tedepr_cli.kernels import build, chain_train
from tedepr_cli.loading import load_model
from tedepr_cli.masks import attach_masks, plain_named_parameters
from tedepr_cli.pruning.prune import PruneOptions, prune
from tedepr_cli.tensorized.plan import build_layer
from tedepr_cli.tensorized.train_path import rebuildable, set_train_paths, uniform
from tedepr_cli.train import TrainOptions, finetune

from .conftest import LENET300, MNIST

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler: the kernel cannot be built")

SPECS = {
    "tt2": {"type": "linear", "format": "tt", "in_modes": [4, 7], "out_modes": [5, 3], "ranks": [1, 3, 1]},
    "tt3": {"type": "linear", "format": "tt", "in_modes": [4, 7, 6], "out_modes": [5, 3, 4],
            "ranks": [1, 3, 2, 1]},
    "tr2": {"type": "linear", "format": "tr", "in_modes": [4, 6], "out_modes": [5, 3],
            "ranks": [2, 3, 2, 2, 2]},
    "tr3": {"type": "linear", "format": "tr", "in_modes": [3, 4, 5], "out_modes": [2, 7],
            "ranks": [2, 3, 2, 3, 2, 2]},
}


def _layer(spec: dict, density: float, dead: bool, seed: int = 0):
    """A layer with normal cores and bias and random masks keeping ``density``; ``dead``
    also prunes the first and last input-mode values of core 1 whole, so that step 0 has
    dead free groups (outputs no later step reads)."""
    torch.manual_seed(seed)
    layer = build_layer(spec)
    with torch.no_grad():
        for c in layer.cores:
            c.normal_()
        layer.bias.normal_()
    masks = {}
    for k, c in enumerate(layer.cores):
        m = torch.rand(c.shape) < density
        if dead and k == 1:
            m[:, 0] = False
            m[:, -1] = False
        masks[f"cores.{k}"] = m
    attach_masks(layer, masks)
    return layer


def _grads(layer, x, w, path, x_grad=True):
    """Output and the gradients of x (unless not ``x_grad``), of every trainable tensor
    (plain names) under the linear loss <y, w>, on ``path``."""
    layer.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_(x_grad)
    layer.train_path = path
    y = layer(xr)
    (y * w).sum().backward()
    got = {"x": xr.grad} if x_grad else {}
    return y.detach(), {**got, **{n: p.grad for n, p in plain_named_parameters(layer).items()}}


def _rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("batch", [1, 6, 37])
@pytest.mark.parametrize("density,dead", [(1.0, False), (0.35, False), (0.5, True)])
@pytest.mark.parametrize("name", list(SPECS))
def test_outputs_and_every_gradient_equal_the_float64_chain(name, density, dead, batch):
    layer = _layer(SPECS[name], density, dead)
    plan = layer._train_chain([layer.cores.parametrizations[str(k)][0].mask for k in range(len(layer.cores))])
    if dead:  # the case is real: step 0 computes only some of its free groups
        assert plan.layout.steps[0].live_groups < plan.layout.steps[0].g_in
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, layer.in_features, generator=gen)
    w = torch.randn(batch, layer.out_features, generator=gen)
    calls = []
    real = chain_train._ChainFn.apply
    chain_train._ChainFn.apply = lambda *a: calls.append(1) or real(*a)
    try:
        y, got = _grads(layer, x, w, "kernel")
    finally:
        chain_train._ChainFn.apply = real
    assert calls, "the kernel path did not run"
    ref = copy.deepcopy(layer).double()
    yd, want = _grads(ref, x.double(), w.double(), "chain")
    assert _rel(y, yd) < 1e-5
    assert set(got) == set(want) and len(got) == len(layer.cores) + 2  # x, bias, every core
    for n in want:
        assert got[n].dtype == torch.float32 and got[n].shape == want[n].shape
        assert _rel(got[n], want[n]) < 1e-5, n
    for k in range(len(layer.cores)):  # pruned entries get exactly zero
        mask = layer.cores.parametrizations[str(k)][0].mask
        assert (got[f"cores.{k}"][~mask] == 0).all()
    # without an input gradient the first step's core gradients are read in place (no gather)
    _, alone = _grads(layer, x, w, "kernel", x_grad=False)
    assert set(alone) == set(want) - {"x"} and all(_rel(alone[n], want[n]) < 1e-5 for n in alone)


def test_no_input_gradient_is_computed_when_none_is_needed():
    layer = _layer(SPECS["tt3"], 0.5, False)
    layer.train_path = "kernel"
    x = torch.randn(9, layer.in_features)
    (layer(x) ** 2).sum().backward()
    got = {n: p.grad.clone() for n, p in plain_named_parameters(layer).items()}
    layer.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_(True)
    (layer(xr) ** 2).sum().backward()
    assert all(torch.equal(got[n], p.grad) for n, p in plain_named_parameters(layer).items())


def test_leading_dims_and_unmasked_cores_train_every_entry():
    """A layer without masks keeps every entry (its zeros are trainable), and (..., N)
    inputs run as rows."""
    torch.manual_seed(1)
    layer = build_layer(SPECS["tr2"])
    with torch.no_grad():
        for c in layer.cores:
            c.normal_()
        layer.cores[0][0, 0, 0] = 0.0  # a zero value, not a pruned entry
    x, w = torch.randn(3, 5, layer.in_features), torch.randn(3, 5, layer.out_features)
    y, got = _grads(layer, x, w, "kernel")
    yd, want = _grads(copy.deepcopy(layer).double(), x.double(), w.double(), "chain")
    assert y.shape == (3, 5, layer.out_features) and _rel(y, yd) < 1e-5
    assert got["cores.0"][0, 0, 0] != 0 and all(_rel(got[n], want[n]) < 1e-5 for n in want)


def test_the_packed_structure_follows_the_masks_when_they_change():
    layer = _layer(SPECS["tt2"], 0.6, False)
    x, w = torch.randn(4, layer.in_features), torch.randn(4, layer.out_features)
    _grads(layer, x, w, "kernel")
    attach_masks(layer, {"cores.0": torch.rand(layer.cores[0].shape) < 0.3})  # in place: same tensor
    y, got = _grads(layer, x, w, "kernel")
    yd, want = _grads(copy.deepcopy(layer).double(), x.double(), w.double(), "chain")
    assert _rel(y, yd) < 1e-5 and all(_rel(got[n], want[n]) < 1e-5 for n in want)


@pytest.fixture(scope="module")
def pruned():
    art = load_model(LENET300, parse_arch("lenet300"))
    out, _ = prune(art, PruneOptions(sparsity=0.995, criterion="snip"), MNIST)
    return out


def test_masks_stay_exactly_zero_through_optimizer_steps(pruned):
    model = copy.deepcopy(pruned.model).train()
    set_train_paths(model, uniform(model, "kernel"))
    assert all(m.train_path == "kernel" for m in rebuildable(model).values())
    params = plain_named_parameters(model)
    opt = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    before = {n: p.detach().clone() for n, p in params.items()}
    for _ in range(5):
        x = torch.rand(16, 1, 28, 28, generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), torch.randint(0, 10, (16,), generator=gen)).backward()
        opt.step()
    for layer_name, layer in rebuildable(model).items():
        assert layer.training_on_kernel(torch.rand(2, layer.in_features))
        for k in range(len(layer.cores)):
            mask = layer.cores.parametrizations[str(k)][0].mask
            name = f"{layer_name}.cores.{k}"
            assert (params[name].detach()[~mask] == 0).all()
            assert not torch.equal(params[name].detach()[mask], before[name][mask])  # it trained


def test_finetune_on_the_kernel_follows_the_chains_loss_trajectory(pruned, tmp_path):
    hist = {}
    for path in ("kernel", "chain"):
        _, summary = finetune(pruned, MNIST, tmp_path / path, TrainOptions(
            epochs=3, batch_size=32, limit_train=160, lr=3e-3, seed=1, train_path=path))
        assert {t["path"] for t in summary["train_paths"].values()} == {path}
        hist[path] = [h["train_loss"] for h in summary["history"]]
    assert len(hist["kernel"]) == 3 and hist["kernel"][-1] < hist["kernel"][0]
    assert hist["kernel"] == pytest.approx(hist["chain"], rel=1e-4)


def test_the_chain_runs_where_the_kernel_cannot(monkeypatch):
    """TEDEPR_KERNELS=0 (no library), float64, no autograd, a torch.func transform: the chain."""
    layer = _layer(SPECS["tt2"], 0.5, False)
    layer.train_path = "kernel"
    x = torch.randn(3, layer.in_features)
    assert layer.training_on_kernel(x)
    calls = []
    monkeypatch.setattr(chain_train, "linear", lambda *a: calls.append(1))
    with torch.no_grad():
        assert not layer.training_on_kernel(x)
        layer(x)
    assert not copy.deepcopy(layer).double().training_on_kernel(x.double())
    monkeypatch.setenv("TEDEPR_KERNELS", "0")
    build.reset()
    try:
        assert not layer.training_on_kernel(x)
        y = layer(x.requires_grad_(True))
        y.sum().backward()
        assert x.grad is not None
    finally:
        monkeypatch.delenv("TEDEPR_KERNELS")
        build.reset()
    assert not calls
    assert layer.training_on_kernel(x)


def test_double_backward_differentiates_the_torch_chain():
    """The pruning criteria's Hessian-vector products (create_graph=True) through a layer
    on the kernel equal those through its chain."""
    layer = _layer(SPECS["tr2"], 0.6, True)
    x = torch.randn(5, layer.in_features)
    params = list(plain_named_parameters(layer).values())
    v = [torch.randn_like(p) for p in params]
    hvp = {}
    for path in ("kernel", "chain"):
        layer.train_path = path
        loss = (layer(x).tanh() ** 2).sum()
        g = torch.autograd.grad(loss, params, create_graph=True)
        hvp[path] = torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, v, strict=True)), params)
    for a, b in zip(hvp["kernel"], hvp["chain"], strict=True):
        assert _rel(a, b) < 1e-4


def test_the_kernel_path_is_for_linear_chains_only():
    import tedepr_cli as tedepr

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.Flatten(),
                            torch.nn.Linear(16 * 6 * 6, 24))
    model = tedepr.tensorize(m, example_input=torch.rand(2, 8, 6, 6), rank=2)
    assert uniform(model, "kernel") == {"0": "chain", "2": "kernel"}
    with pytest.raises(ValueError, match="no compiled training chain"):
        set_train_paths(model, {"0": "kernel"})
    with pytest.raises(ValueError, match="train path must be one of"):
        set_train_paths(model, {"2": "fast"})


def test_kernel_asked_where_it_cannot_run_records_and_says_the_chain(pruned, tmp_path, monkeypatch, caplog):
    """--train-path kernel without the library: the run records what ran (the chain) and
    says so in one warning, rather than recording 'kernel'."""
    monkeypatch.setenv("TEDEPR_KERNELS", "0")
    build.reset()
    try:
        assert set(uniform(pruned.model, "kernel").values()) == {"chain"}
        with caplog.at_level("WARNING", logger="tedepr"):
            _, summary = finetune(pruned, MNIST, tmp_path / "k", TrainOptions(
                epochs=1, batch_size=32, limit_train=64, seed=1, train_path="kernel"))
    finally:
        monkeypatch.delenv("TEDEPR_KERNELS")
        build.reset()
    assert {t["path"] for t in summary["train_paths"].values()} == {"chain"}
    assert "no layer can train on the compiled kernel here" in caplog.text


def test_an_lstm_chain_w_hh_has_no_train_path_of_its_own():
    """A chain W_hh is only read rebuilt (TensorizedLSTM.weight_hh): no path is listed for it."""
    from tedepr_cli.tensorized.plan import PlanOptions, plan_model
    from tedepr_cli.zoo import lstm

    model = lstm()
    plans = plan_model(model, (28, 28), PlanOptions(lstm_hh="tensorized", rank=2))
    lstm_spec = next(p.spec for p in plans if p.name == "lstm")
    layer = build_layer(lstm_spec)
    assert [n for n in rebuildable(layer)] == ["ih.0"]
    assert "ih.0" in uniform(layer, "kernel")


def test_a_train_path_asked_of_a_model_without_tensorized_layers_says_it_changes_nothing(tmp_path, caplog):
    art = load_model(LENET300, parse_arch("lenet300"))
    with caplog.at_level("WARNING", logger="tedepr"):
        finetune(art, MNIST, tmp_path / "d", TrainOptions(epochs=1, batch_size=32, limit_train=64, seed=1,
                                                        train_path="kernel"))
    assert "train_path kernel: the model has no tensorized layer" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="tedepr"):  # the default asks nothing: it says nothing
        finetune(art, MNIST, tmp_path / "l", TrainOptions(epochs=1, batch_size=32, limit_train=64, seed=1))
    assert "train_path" not in caplog.text
