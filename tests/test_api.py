"""The Python API on models defined here (not in the zoo), and masks that ride on the module."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tedepr_cli as tedepr
from tedepr_cli.errors import BadInput, UsageError
from tedepr_cli.masks import attach_masks, folded_copy, get_masks, plain_named_parameters

ROOT = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    """A small CNN written here: conv stem, a conv the planner tensorizes, two Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 7 * 7, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem(x)), 2)
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.head(F.relu(self.fc(x.flatten(1))))


def _data(n: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)


def _readme_python_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_block_runs_on_a_model_defined_here(tmp_path, monkeypatch):
    """The README's 5-line example, exactly as written, on a model that is not in the zoo."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    x, y, loader = _data()
    seen = {}

    def my_own_training_loop(model, loader):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        model.train()
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        seen["trained"] = True

    ns = {"net": Net(), "x": x, "loader": loader, "my_own_training_loop": my_own_training_loop}
    exec(compile(_readme_python_block(), "README.md", "exec"), ns)
    model, report, fast = ns["model"], ns["report"], ns["fast"]
    assert seen["trained"]
    assert report["kept"] == report["budget"] > 0
    masks = get_masks(model)
    assert masks and all(not plain_named_parameters(model)[n].detach()[~m].any() for n, m in masks.items())
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "model.onnx").is_file()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(fast(x[:32]), model(x[:32]), rtol=1e-4, atol=1e-5)
    # the stored model reloads with its masks (the import path is confirmed by naming it)
    import sys
    import types

    mod = types.ModuleType("mypkg.models")
    mod.Net = Net
    monkeypatch.setitem(sys.modules, "mypkg", types.ModuleType("mypkg"))
    monkeypatch.setitem(sys.modules, "mypkg.models", mod)
    back = tedepr.load(tmp_path / "out", arch="mypkg.models:Net")
    assert {n: m.tolist() for n, m in get_masks(back).items()} == {n: m.tolist() for n, m in masks.items()}
    with torch.no_grad():
        assert torch.equal(back(x[:8]), model(x[:8]))


def _pruned(kind: str) -> nn.Module:
    torch.manual_seed(1)
    x, _, loader = _data()
    if kind == "tt":
        model = tedepr.tensorize(Net(), example_input=x[:1], rank=4)
        sparsity = 0.97
    else:
        model = Net()
        sparsity = 0.9
    tedepr.prune(model, sparsity=sparsity, batches=loader, criterion="snip", example_input=x[:1])
    return model


def _read(model: nn.Module, name: str) -> torch.Tensor:
    """The weight a forward reads (``original * mask`` for a masked parameter)."""
    mod, _, attr = name.rpartition(".")
    with torch.no_grad():
        return getattr(model.get_submodule(mod), attr).detach()


def _train_and_check(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """SGD (momentum 0.9, weight decay) then AdamW on a plain loop written here; after every
    step every pruned entry must be exactly 0 in memory: in the weight the forward reads and
    in the tensor the optimizer updates. Returns how many kept entries moved."""
    x, y, loader = _data(seed=3)
    before = {n: p.detach().clone() for n, p in plain_named_parameters(model).items()}
    model.train()
    for make in (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2),
                 lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2)):
        opt = make(model.parameters())
        for _ in range(2):
            for xb, yb in loader:
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
                stored = plain_named_parameters(model)
                effective = {n: _read(model, n) for n in masks}
                for n, m in masks.items():
                    assert torch.count_nonzero(stored[n].detach()[~m]) == 0, n
                    assert torch.count_nonzero(effective[n][~m]) == 0, n
    after = plain_named_parameters(model)
    return sum(int((after[n].detach()[m] != before[n][m]).sum()) for n, m in masks.items())


@pytest.mark.parametrize("kind", ["tt", "dense"])
def test_any_optimizer_keeps_pruned_entries_exactly_zero(kind):
    model = _pruned(kind)
    masks = {n: m.clone() for n, m in get_masks(model).items()}
    assert masks and sum(int((~m).sum()) for m in masks.values()) > 0
    control = folded_copy(model)  # the same weights with the masks removed
    assert _train_and_check(model, masks) > 0  # it trained
    # control: without the mask riding on the module, the same loop revives pruned entries,
    # so the check above would catch a broken mechanism
    x, y, loader = _data(seed=3)
    opt = torch.optim.SGD(control.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    control.train()
    for xb, yb in loader:
        opt.zero_grad()
        F.cross_entropy(control(xb), yb).backward()
        opt.step()
    revived = sum(int(torch.count_nonzero(plain_named_parameters(control)[n].detach()[~m]))
                  for n, m in masks.items())
    assert revived > 0


def test_masks_survive_deepcopy_save_and_load(tmp_path):
    model = _pruned("tt")
    masks = get_masks(model)
    twin = copy.deepcopy(model)
    assert {n: m.tolist() for n, m in get_masks(twin).items()} == {n: m.tolist() for n, m in masks.items()}
    folded = folded_copy(twin)  # folding a copy must not disturb the model it came from
    assert not get_masks(folded)
    x, _, _ = _data(8)
    model.eval()
    twin.eval()
    folded.eval()
    with torch.no_grad():
        assert torch.equal(twin(x), model(x)) and torch.equal(folded(x), model(x))
    path = tedepr.save(model, tmp_path / "m.safetensors", arch="tests.test_api:Net")
    assert path.is_file()
    with pytest.raises(Exception, match="import path"):
        tedepr.load(path)  # an import path runs code: only when named again
    back = tedepr.load(path, arch="tests.test_api:Net")
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_artifact_written_before_masks_rode_on_the_module_still_loads():
    """tests/data/v0_1_lenet300_pruned.safetensors was written by tedepr 0.1.0 (masks beside
    the model); it loads with the masks attached and the same outputs."""
    data = ROOT / "tests" / "data"
    model = tedepr.load(data / "v0_1_lenet300_pruned.safetensors")
    io = np.load(data / "v0_1_lenet300_pruned.io.npz")
    masks = get_masks(model)
    assert len(masks) == 6 and sum(int(m.sum()) for m in masks.values()) == 1331
    with torch.no_grad():
        assert torch.equal(model(torch.from_numpy(io["x"])), torch.from_numpy(io["y"]))


def test_library_leaves_the_callers_state_alone():
    model = Net().train()
    model.bn.eval()  # a frozen BatchNorm inside a training model: a mix of flags to keep
    flags = {n: m.training for n, m in model.named_modules()}
    x, _, loader = _data()
    threads = torch.get_num_threads()
    tedepr.prune(model, sparsity=0.9, batches=loader, criterion="snip", example_input=x[:1])
    from tedepr_cli.evaluate import evaluate, num_outputs

    assert num_outputs(model, (1, 28, 28)) == 10
    evaluate(model, x[:8], torch.zeros(8, dtype=torch.long))
    assert {n: m.training for n, m in model.named_modules() if ".parametrizations" not in n} == flags
    model.train()
    fast = tedepr.accelerate(model, batch=4, threads=1, example_input=x[:1])
    assert torch.get_num_threads() == threads
    assert model.training and get_masks(model)  # accelerate works on a copy
    with torch.no_grad():
        assert torch.allclose(fast(x[:4]), model.eval()(x[:4]), rtol=1e-4, atol=1e-5)


def test_api_errors_are_typed():
    model = Net()
    x, _, loader = _data()
    with pytest.raises(UsageError, match="example_input"):
        tedepr.tensorize(model)  # no input shape anywhere
    with pytest.raises(UsageError, match="rank"):
        tedepr.tensorize(model, example_input=x[:1], rank="big")
    with pytest.raises(UsageError, match="pairs"):
        tedepr.prune(model, sparsity=0.9, batches=[x[:4]], criterion="snip", example_input=x[:1])
    tedepr.prune(model, sparsity=0.9, batches=loader, criterion="snip", example_input=x[:1])
    with pytest.raises(BadInput, match="already pruned"):
        tedepr.prune(model, sparsity=0.9, batches=loader, criterion="snip", example_input=x[:1])
    with pytest.raises(UsageError, match="arch"):
        tedepr.save(model, "unused", example_input=x[:1])
    with pytest.raises(UsageError, match="at least 2"):
        tedepr.export_onnx(model, "unused.onnx", example_input=x[:1])


def test_attach_masks_checks_names_and_shapes():
    model = Net()
    with pytest.raises(KeyError):
        attach_masks(model, {"nope.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        attach_masks(model, {"fc.weight": torch.ones(3, dtype=torch.bool)})


def test_from_linear_and_from_conv2d_build_drop_in_layers_from_the_weights():
    """TT-SVD recovers a weight that has the layer's TT rank exactly (made here from a random
    rank-3 chain), and the layer keeps the original's bias and interface."""
    torch.manual_seed(0)
    lin, conv = nn.Linear(64, 48), nn.Conv2d(8, 12, 3, padding=1)
    with torch.no_grad():
        lin.weight.copy_(tedepr.from_linear(lin, rank=3, modes=2, init="random").dense_weight())
        conv.weight.copy_(tedepr.from_conv2d(conv, (6, 6), rank=3, modes=2, init="random").dense_weight())
    x, xi = torch.randn(5, 64), torch.randn(2, 8, 6, 6)
    tt, tc = tedepr.from_linear(lin, rank=3, modes=2), tedepr.from_conv2d(conv, (6, 6), rank=3, modes=2)
    assert torch.allclose(tt(x), lin(x), rtol=1e-4, atol=1e-5)
    assert torch.allclose(tc(xi), conv(xi), rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in tt.parameters()) < sum(p.numel() for p in lin.parameters())
    with pytest.raises(BadInput):
        tedepr.from_conv2d(nn.Conv2d(8, 8, 3, groups=8), (6, 6))
