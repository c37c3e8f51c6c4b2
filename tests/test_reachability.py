"""The whole-network collapse guard: reachability of the kept pattern along the model's data
flow (against independent computations and numeric forwards), the refusal (exit 7, one line
naming the broken layer pair, nothing written), the path repair, and `tedepr prune`."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import tedepr_cli.pruning.prune as prune_module
from tedepr_cli.arch import ArchSpec, parse_arch
from tedepr_cli.artifact import Artifact, load_artifact
from tedepr_cli.decompose import DecomposeOptions, decompose
from tedepr_cli.errors import CollapseError
from tedepr_cli.pruning.prune import PruneOptions, prune
from tedepr_cli.pruning.reachability import check_reachability, reachability, repair_paths
from tedepr_cli.pruning.targets import prunable_groups
from tedepr_cli.zoo import MODELS

from .conftest import LENET300, MNIST, run_cli, sample_inputs


# ---------------------------------------------------------------------------- helpers
class MLP(nn.Module):
    def __init__(self, sizes=(4, 6, 3)):
        super().__init__()
        pairs = zip(sizes[:-1], sizes[1:], strict=True)
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in pairs)
        self.input_shape, self.input_kind = (sizes[0],), "flat"

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else torch.relu(layer(x))
        return x


def _masks(model, keep: dict[str, list[tuple]] | None = None, full: bool = False):
    """Boolean masks for every prunable tensor: all True (``full``) or all False, then the
    listed entries set True."""
    params = dict(model.named_parameters())
    names = [n for g in prunable_groups(model) for n in g.params]
    out = {n: torch.full(params[n].shape, full, dtype=torch.bool) for n in names}
    for n, entries in (keep or {}).items():
        for e in entries:
            out[n][e] = True
    return out


def _masked_outputs(model, masks, x, train=False):
    """The pruned model's outputs (entries outside ``masks`` zeroed), computed numerically."""
    m = copy.deepcopy(model).train(train)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for n, k in masks.items():
            params[n].mul_(k.to(params[n].dtype))
        return m(x)


def _varies(y) -> bool:
    return float((y - y[0]).abs().max()) > 1e-6


# ---------------------------------------------------------------------------- the check
def test_mlp_reachability_is_the_boolean_product_of_the_masks():
    """Random masks at many densities: the reached outputs are exactly those of the boolean
    matrix product of the masks, and the refusal happens exactly when that product is empty."""
    model = MLP((12, 10, 8, 5))
    with torch.no_grad():  # positive weights: every kept path is also active (see the ReLU tests)
        for w in model.parameters():
            w.abs_()
    g = torch.Generator().manual_seed(0)
    cut = connected = 0
    for trial in range(120):
        p = [0.03, 0.06, 0.1, 0.2][trial % 4]
        masks = {n: torch.rand(w.shape, generator=g) < p for n, w in model.named_parameters()}
        reach = torch.ones(12, dtype=torch.bool)
        for i in range(3):
            reach = (masks[f"layers.{i}.weight"].double() @ reach.double()) > 0
        r = reachability(model, model.input_shape, masks)
        assert r.reached == torch.nonzero(reach).reshape(-1).tolist()
        assert r.connected == bool(reach.any()) and r.traced
        cut += not r.connected
        connected += r.connected
        if not r.connected:
            with pytest.raises(CollapseError):
                check_reachability(model, model.input_shape, masks)
    assert cut > 10 and connected > 10  # both outcomes exercised


def test_cut_names_the_broken_layer_pair_in_one_line():
    model = MLP()
    masks = _masks(model, {"layers.0.weight": [(2, 0)], "layers.1.weight": [(1, 3)]})
    r = reachability(model, model.input_shape, masks)
    assert not r.connected and r.breaks == ("layers.0", "layers.1") and r.reached_units == 1
    with pytest.raises(CollapseError) as e:
        check_reachability(model, model.input_shape, masks)
    msg = str(e.value)
    assert "\n" not in msg and "between layers.0 and layers.1" in msg and "repair_paths" in msg
    # layers.1 reading the unit layers.0 reaches: one output depends on the input
    masks["layers.1.weight"][1, 2] = True
    r = check_reachability(model, model.input_shape, masks)
    assert r.connected and r.reached == [1] and r.outputs == 3
    # nothing read from the input at all: it breaks at the first layer
    r = reachability(model, model.input_shape, _masks(model, {"layers.1.weight": [(0, 0)]}))
    assert r.breaks == ("the input", "layers.0")


def test_a_kept_path_whose_relu_never_fires_carries_nothing():
    """Structurally connected, but layers.1's only kept weight is negative on a ReLU output
    (>= 0): the unit after it is <= 0 for every input, so the output is constant."""
    model = MLP((4, 6, 5, 3))
    with torch.no_grad():
        for w in model.parameters():
            w.abs_()
        model.layers[1].weight[1, 2] = -1.0
    masks = _masks(model, {"layers.0.weight": [(2, 0)], "layers.1.weight": [(1, 2)],
                           "layers.2.weight": [(0, 1)]})
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    assert not _varies(_masked_outputs(model, masks, x))
    r = reachability(model, model.input_shape, masks, x)
    assert not r.connected and r.break_kind == "activation" and r.breaks[0] == "layers.1"
    with pytest.raises(CollapseError, match="after layers.1: .*ReLU"):
        check_reachability(model, model.input_shape, masks, x)
    fixed = repair_paths(model, model.input_shape, masks, every_output=False, inputs=x)
    assert fixed.reach.connected and _varies(_masked_outputs(model, fixed.masks, x))
    # the same kept entries with a positive weight: an active path, accepted
    with torch.no_grad():
        model.layers[1].weight[1, 2] = 1.0
    assert check_reachability(model, model.input_shape, masks, x).reached == [0]


@pytest.mark.parametrize("fmt,conv", [("tt", False), ("tr", False), ("tt", True), ("tr", True)])
def test_tensorized_layer_reach_matches_its_dense_weight(fmt, conv):
    """A tensorized layer connects exactly the unit pairs where its dense equivalent weight
    (product of the masked random cores) is non-zero; a dense selector in front restricts
    the reached inputs to a subset."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            if conv:
                self.sel = nn.Conv2d(8, 8, 1, bias=False)
                self.body = nn.Conv2d(8, 12, 3, padding=1, bias=False)
                self.input_shape = (8, 6, 6)
            else:
                self.sel = nn.Linear(16, 16, bias=False)
                self.body = nn.Linear(16, 12, bias=False)
                self.input_shape = (16,)
            self.input_kind = "image" if conv else "flat"

        def forward(self, x):
            return self.body(self.sel(x))

    torch.manual_seed(0)
    art, _ = decompose(Artifact(model=Net(), arch=ArchSpec("x")),
                       DecomposeOptions(format=fmt, rank=3, modes=2, init="random", include=["body"]))
    model = art.model
    assert hasattr(model.body, "cores")
    g = torch.Generator().manual_seed(1)
    n_in = 8 if conv else 16
    checked = 0
    for _ in range(12):
        masks = _masks(model, full=True)
        for n in masks:
            if "cores" in n:
                masks[n] = torch.rand(masks[n].shape, generator=g) < 0.35
        subset = torch.rand(n_in, generator=g) < 0.5
        sel = masks["sel.weight"]
        sel.zero_()
        idx = torch.arange(n_in)[subset]
        sel[idx, idx] = True
        body = copy.deepcopy(model.body)
        with torch.no_grad():
            for i, c in enumerate(body.cores):
                c.mul_(masks[f"body.cores.{i}"])
            w = body.dense_weight()
        w = w.abs().sum(dim=(2, 3)) if conv else w.abs()  # (out, in) channel pattern
        expect = torch.nonzero((w[:, subset] > 0).any(dim=1)).reshape(-1).tolist()
        r = reachability(model, model.input_shape, masks)
        assert r.reached == expect
        checked += bool(expect)
    assert checked >= 3


def _dw_cnn():
    class DW(nn.Module):
        """stem 1->4, depthwise 3x3 (groups=4), pointwise 4->4, pool, head 4->3."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
            self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
            self.pw = nn.Conv2d(4, 4, 1, bias=False)
            self.head = nn.Linear(4, 3)
            self.input_shape, self.input_kind = (1, 8, 8), "image"

        def forward(self, x):
            x = torch.relu(self.dw(torch.relu(self.stem(x))))
            return self.head(torch.relu(self.pw(x)).mean(dim=(2, 3)))

    torch.manual_seed(0)
    return DW().eval()


def test_depthwise_conv_is_followed_per_group():
    model = _dw_cnn()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cut = _masks(model, full=True)
    cut["stem.weight"][1:] = False  # the stem feeds channel 0 only ...
    cut["dw.weight"][[0, 2, 3]] = False  # ... the depthwise conv keeps channel 1 only
    r = reachability(model, model.input_shape, cut)
    assert not r.connected and r.breaks == ("stem", "dw")
    assert not _varies(_masked_outputs(model, cut, x))  # really constant: every input, same logits
    ok = _masks(model, full=True)
    ok["stem.weight"][1:] = False
    ok["dw.weight"][1:] = False  # depthwise keeps channel 0: the stem's channel goes on
    assert reachability(model, model.input_shape, ok).connected
    assert _varies(_masked_outputs(model, ok, x))


def _dw_cnn_artifact():
    """The depthwise CNN with weights that make magnitude pruning keep the stem's channel 0
    and the depthwise conv's channel 1 (issue 15, item 8)."""
    model = _dw_cnn()
    with torch.no_grad():
        model.stem.weight.mul_(0.01)[0] = 5.0
        model.dw.weight.abs_().mul_(0.01)[1] = 5.0  # positive: a repaired path is active
        model.pw.weight.fill_(1.0)
    return Artifact(model=model, arch=ArchSpec("x"))


def test_depthwise_cnn_prune_refuses_or_repairs(monkeypatch):
    dense = sum(g.dense_count for g in prunable_groups(_dw_cnn()))
    opts = {"sparsity": 1 - 40 / dense, "criterion": "magnitude", "decompose": False}
    with pytest.raises(CollapseError, match="between stem and dw"):
        prune(_dw_cnn_artifact(), PruneOptions(**opts))
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out, rep = prune(_dw_cnn_artifact(), PruneOptions(**opts, repair_paths=True))
    assert rep["kept"] == 40 + rep["repair"]["added"] and 1 <= rep["repair"]["added"] <= 4
    with torch.no_grad():
        assert _varies(out.model(x))
    assert "dw.weight" in rep["repair"]["tensors"] or "stem.weight" in rep["repair"]["tensors"]
    # without the whole-network check the same run "succeeds" with a constant output (the bug)
    monkeypatch.setattr(prune_module, "check_reachability", lambda *a, **k: reachability(*a, **k))
    out, _ = prune(_dw_cnn_artifact(), PruneOptions(**opts))
    with torch.no_grad():
        assert not _varies(out.model(x))


class Residual(nn.Module):
    """inp -> [h + b2(relu(b1(h)))] -> out; ``skip=False`` drops the ``h +``."""

    def __init__(self, skip=True):
        super().__init__()
        self.skip = skip
        self.inp, self.b1, self.b2 = (nn.Linear(8, 8, bias=False) for _ in range(3))
        self.out = nn.Linear(8, 3, bias=False)
        self.input_shape, self.input_kind = (8,), "flat"
        torch.manual_seed(0)
        with torch.no_grad():
            for m in (self.inp, self.b1, self.b2, self.out):
                m.weight.uniform_(-0.01, 0.01)
            self.inp.weight.add_(10 * torch.eye(8))  # magnitude keeps the diagonal ...
            self.b1.weight[0, 7] = 8.0  # ... the branch: unit 7 -> 0
            self.b2.weight[5, 1] = 8.0  # ... then 1 -> 5: the branch is cut
            self.out.weight[:, :3] += 9 * torch.eye(3)  # the head reads units 0..2

    def forward(self, x):
        h = torch.relu(self.inp(x))
        b = self.b2(torch.relu(self.b1(h)))
        return self.out(h + b if self.skip else b)


def test_skip_path_keeps_a_network_with_a_cut_branch_connected():
    opts = PruneOptions(sparsity=1 - 13 / 216, criterion="magnitude", decompose=False)
    out, rep = prune(Artifact(model=Residual(), arch=ArchSpec("x")), opts)
    assert rep["kept"] == 13 and rep["reachability"]["outputs_reached"] == 3
    assert rep["reachability"]["cut_layers"] == ["b2"]
    assert any("pass nothing on" in w and "b2" in w for w in rep["warnings"])
    # the same kept entries without the skip: every path runs through the cut branch
    with pytest.raises(CollapseError, match="between b1 and b2"):
        prune(Artifact(model=Residual(skip=False), arch=ArchSpec("x")), opts)


def test_a_residual_add_passes_on_both_operands():
    model = Residual()
    diag = [(i, i) for i in range(4)]  # inp passes units 0..3 on
    via_branch = _masks(model, {"inp.weight": diag, "b1.weight": [(4, 0)], "b2.weight": [(5, 4)],
                                "out.weight": [(1, 5)]})  # unit 5 exists only in the branch
    via_skip = _masks(model, {"inp.weight": diag, "b1.weight": [(4, 0)], "b2.weight": [(5, 4)],
                              "out.weight": [(2, 0)]})  # unit 0 arrives only through the skip
    assert reachability(model, model.input_shape, via_branch).reached == [1]
    assert reachability(model, model.input_shape, via_skip).reached == [2]


def test_resnet20_skip_paths_carry_a_channel_through_option_a_shortcuts():
    """Every block's branch cut: the stem's channel 0 reaches the head through the
    parameter-free shortcuts (stride-2 subsampling, channel zero-padding: 0 -> 8 -> 24)."""
    model = MODELS.get("resnet20")(in_channels=1).eval()
    masks = _masks(model, full=True)
    for n in masks:
        if n.startswith("layer"):
            masks[n][:] = False
    masks["conv1.weight"][1:] = False
    masks["fc.weight"][:, 24] = False
    r = reachability(model, (1, 32, 32), masks)
    assert not r.connected and r.breaks == ("conv1", "fc")
    masks["fc.weight"][:, 24] = True
    masks["fc.weight"][:, :24] = False
    masks["fc.weight"][:, 25:] = False
    r = check_reachability(model, (1, 32, 32), masks)
    assert r.outputs_reached == 10 and "layer1.0.conv1" in r.cut_layers
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert _varies(_masked_outputs(model, masks, x))


def test_lstm_reach_follows_the_recurrence():
    model = MODELS.get("lstm")(hidden=8).eval()
    h = 8
    keep = {"lstm.weight_ih_l0": [(3, 0)],  # input gate of unit 3 reads feature 0
            "fc.weight": [(2, 5)]}  # the head reads unit 5 only
    cut = _masks(model, keep)
    assert not reachability(model, model.input_shape, cut).connected
    keep["lstm.weight_hh_l0"] = [(h + 5, 3)]  # forget gate of unit 5 reads unit 3 (one step later)
    ok = _masks(model, keep)
    r = reachability(model, model.input_shape, ok)
    assert r.connected and r.reached == [2]
    with torch.no_grad():  # kept weights large enough for the change to show in float32
        for n, entries in keep.items():
            for e in entries:
                model.get_parameter(n)[e] = 3.0
    x = torch.randn(4, *model.input_shape, generator=torch.Generator().manual_seed(0))
    assert _varies(_masked_outputs(model, ok, x)) and not _varies(_masked_outputs(model, cut, x))


def test_attention_passes_the_values_on():
    """nn.MultiheadAttention keeping only value rows of its packed projection: queries and
    keys are constant (uniform attention), the output is the mean of the values: reached."""

    class Att(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)
            self.input_shape, self.input_kind = (5, 8), "sequence"

        def forward(self, x):
            return self.head(self.mha(x, x, x, need_weights=False)[0].mean(1))

    torch.manual_seed(0)
    model = Att().eval()
    values = _masks(model, full=True)
    values["mha.in_proj_weight"][:16] = False  # no query, no key rows
    x = torch.randn(8, 5, 8, generator=torch.Generator().manual_seed(0))
    assert reachability(model, model.input_shape, values, x).outputs_reached == 3
    assert _varies(_masked_outputs(model, values, x))
    values["mha.in_proj_weight"][16:] = False
    assert not reachability(model, model.input_shape, values, x).connected


class Untraceable(MLP):
    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace this
            x = x * 2
        return super().forward(x)


def test_untraceable_model_follows_the_layer_order_and_says_so():
    model = Untraceable()
    r = reachability(model, model.input_shape, _masks(model, full=True))
    assert r.connected and not r.traced and "torch.fx could not trace the model's graph" in r.note
    cut = _masks(model, {"layers.0.weight": [(2, 0)], "layers.1.weight": [(1, 3)]})
    with pytest.raises(CollapseError, match="between layers.0 and layers.1.*order they run"):
        check_reachability(model, model.input_shape, cut)
    opts = PruneOptions(sparsity=0.5, criterion="magnitude", decompose=False)
    _, rep = prune(Artifact(model=model, arch=ArchSpec("x")), opts)
    assert rep["reachability"]["traced"] is False
    said = [w for w in rep["warnings"] if "order they run" in w]  # once, with what the check loses
    assert len(said) == 1 and "does not see skip connections" in said[0] and "ReLUs" in said[0]


@pytest.mark.parametrize("name,kwargs,fmt", [
    ("lenet5", {}, "tt"), ("resnet20", {"in_channels": 1, "width": 0.5}, "tr"),
    ("vit_tiny", {"dim": 32, "depth": 2, "attn": "mha"}, None),
    ("lstm", {"hidden": 16, "num_layers": 2, "bidirectional": True}, "tt")])
def test_an_output_that_varies_with_the_input_is_always_reached(name, kwargs, fmt):
    """Soundness on random masks: every output the pruned model numerically varies on
    (same sample inputs, BatchNorm on batch statistics) is reported reached, so the guard
    never refuses a working network; and cut networks do occur at these densities."""
    torch.manual_seed(0)
    art = Artifact(model=MODELS.get(name)(**kwargs).eval(), arch=parse_arch(name, json.dumps(kwargs)))
    if fmt:
        art, _ = decompose(art, DecomposeOptions(format=fmt, rank=2, init="random"))
    model = art.model
    g = torch.Generator().manual_seed(1)
    cut = 0
    for p in (0.001, 0.005, 0.02, 0.1, 0.4):
        for _ in range(2):
            masks = {n: torch.rand(k.shape, generator=g) < p for n, k in _masks(model).items()}
            x = torch.randn(16, *art.input_shape, generator=g)
            r = reachability(model, art.input_shape, masks, x)
            y = _masked_outputs(model, masks, x, train=True)
            varies = torch.nonzero(((y - y[:1]).abs() > 0).any(0)).reshape(-1).tolist()
            assert set(varies) <= set(r.reached) and r.traced and not r.unknown_ops
            cut += not r.connected
    assert cut >= 1


# ---------------------------------------------------------------------------- repair
def test_repair_adds_the_best_scored_single_entry():
    model = MLP()
    masks = _masks(model, {"layers.0.weight": [(2, 0)], "layers.1.weight": [(1, 3)]})
    scores = {n: torch.rand(m.shape, generator=torch.Generator().manual_seed(0)) for n, m in masks.items()}
    scores["layers.1.weight"][0, 2] = 5.0  # reads the reached unit 2: completes a path alone
    scores["layers.0.weight"][3, 1] = 4.0  # writes unit 3 (read by layers.1): also alone, lower
    fixed = repair_paths(model, model.input_shape, masks, scores, every_output=False)
    assert fixed.added == {"layers.1.weight": 1} and bool(fixed.masks["layers.1.weight"][0, 2])
    assert fixed.reach.connected and fixed.reach.reached == [0]
    assert all(bool((fixed.masks[n] | ~masks[n]).all()) for n in masks)  # only added, never removed
    assert bool(masks["layers.1.weight"][0, 2]) is False  # the input masks are left alone
    full = repair_paths(model, model.input_shape, masks, scores)
    assert full.reach.outputs_reached == 3 and full.total_added == 3


def test_repair_across_two_cut_layers_adds_the_fewest_entries():
    """No single entry reconnects: 0 -> (fc2 reads 5) ... (fc3 reads 6) ... fc4 reads 7."""
    torch.manual_seed(0)
    model = MLP((4, 8, 8, 8, 3))
    with torch.no_grad():
        for layer in model.layers:
            layer.weight.abs_()  # positive weights: every kept path is active
    masks = _masks(model, {"layers.0.weight": [(0, 0)], "layers.1.weight": [(3, 5)],
                           "layers.2.weight": [(4, 6)], "layers.3.weight": [(0, 7)]})
    assert not reachability(model, model.input_shape, masks).connected
    fixed = repair_paths(model, model.input_shape, masks, every_output=False)
    assert fixed.reach.connected and fixed.total_added == 2
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    assert _varies(_masked_outputs(model, fixed.masks, x))


def test_repair_that_cannot_reconnect_is_a_collapse():
    class Constant(MLP):
        def forward(self, x):
            return super().forward(torch.zeros_like(x))

    model = Constant()
    with pytest.raises(CollapseError, match="even after adding 0 entries|no path"):
        repair_paths(model, model.input_shape, _masks(model, full=True))


# ---------------------------------------------------------------------------- prune / CLI
@pytest.mark.parametrize("name,kwargs", [("lenet300", {}), ("lenet5", {}), ("resnet20", {"in_channels": 1}),
                                         ("vit_tiny", {}), ("lstm", {})])
def test_normal_one_shot_pipeline_is_never_refused(name, kwargs):
    torch.manual_seed(0)
    art = Artifact(model=MODELS.get(name)(**kwargs).eval(), arch=parse_arch(name, json.dumps(kwargs)))
    _, rep = prune(art, PruneOptions(sparsity=0.995, batch_size=32), MNIST)
    r = rep["reachability"]
    assert r["traced"] and r["outputs_reached"] == r["outputs"] == 10 and not r["conservative_ops"]
    assert rep["repair"]["added"] == 0


ISSUE_CASES = {  # issue 15, item 1: each exited 0 with a constant output
    "one-shot-0.9999": ["--sparsity", "0.9999"],
    "dense-snip-0.999": ["--sparsity", "0.999", "--no-decompose", "--criterion", "snip"],
    "one-shot-magnitude-0.999": ["--sparsity", "0.999", "--criterion", "magnitude"],
}


@pytest.mark.parametrize("case", sorted(ISSUE_CASES))
def test_cli_refuses_a_cut_network_and_repairs_it_on_request(tmp_path, case):
    args = ["prune", LENET300, "--arch", "lenet300", *ISSUE_CASES[case], "--data", MNIST]
    r = run_cli(*args, "-o", tmp_path / "cut", "-q")
    assert r.exit_code == 7, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tedepr: layer collapse: ")
    assert "between fc1 and fc2" in lines[0] or "between fc2 and fc3" in lines[0]
    assert not (tmp_path / "cut").exists()
    r = run_cli(*args, "-o", tmp_path / "fixed", "--repair-paths")
    assert r.exit_code == 0, r.stderr
    assert "path repair:" in r.stdout
    art = load_artifact(tmp_path / "fixed")
    x, _ = sample_inputs(art.model, 64)
    with torch.no_grad():
        y = art.model.eval()(x)
    assert _varies(y)  # the output depends on the input (a lone path: small, but it is there)
    m = json.loads((tmp_path / "fixed" / "manifest.json").read_text())["pruning"]
    assert 1 <= m["repair"]["added"] <= 12 and m["kept"] == m["budget"] + m["repair"]["added"]
    assert m["reachability"]["outputs_reached"] == 10


def test_cli_budget_below_the_guard_is_a_collapse_with_fitting_advice(tmp_path):
    base = ["prune", LENET300, "--arch", "lenet300", "--no-decompose", "--criterion", "magnitude", "-q"]
    r = run_cli(*base, "--sparsity", "0.999992", "-o", tmp_path / "a")  # keeps 2 for 3 layers
    assert r.exit_code == 7 and len(r.stderr.strip().splitlines()) == 1
    assert "min-density" not in r.stderr and "lower sparsity" in r.stderr
    r = run_cli(*base, "--sparsity", "0.999", "--min-density", "0.01", "-o", tmp_path / "b")
    assert r.exit_code == 7 and "lower --min-density" in r.stderr
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- reconnect
def test_reconnect_swaps_within_the_budget_and_keeps_every_layer_alive():
    """Where the selection cuts some outputs off the input, the default swaps the entries that
    reconnect them for as many of the lowest-scored kept ones that no output needs: the kept
    count stays the budget. The cut branch's lone entries score lowest but are their layers'
    last paths, so the per-layer guard keeps them and an unread unit's entry goes instead."""
    model = Residual()
    with torch.no_grad():
        model.out.weight[2, 2] = 0.5  # output 2's best entry: the 13th by magnitude
    opts = PruneOptions(sparsity=1 - 12 / 216, criterion="magnitude", decompose=False)
    cut, rep_cut = prune(Artifact(model=copy.deepcopy(model), arch=ArchSpec("x")),
                         PruneOptions(**{**opts.__dict__, "reconnect": False}))
    assert rep_cut["kept"] == 12 and rep_cut["reachability"]["outputs_reached"] == 2
    assert any("1 of 3 outputs depend on no input" in w for w in rep_cut["warnings"])
    out, rep = prune(Artifact(model=model, arch=ArchSpec("x")), opts)
    assert rep["kept"] == 12 and rep["reachability"]["outputs_reached"] == 3
    assert rep["repair"]["tensors"] == {"out.weight": 1}
    assert rep["repair"]["dropped_tensors"] == {"inp.weight": 1}
    assert rep["repair"]["cut_outputs"] == 1 and rep["repair"]["mode"] == "swap"
    assert bool(out.masks["out.weight"][2, 2]) and int(out.masks["b1.weight"].sum()) == 1
    dropped = torch.nonzero(cut.masks["inp.weight"] & ~out.masks["inp.weight"]).tolist()
    assert len(dropped) == 1 and dropped[0][0] == dropped[0][1] >= 3  # a unit no output reads
    assert not any("outputs depend on no input" in w for w in rep["warnings"])
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert float(out.model(x)[:, 2].std()) > 0 and float(cut.model(x)[:, 2].std()) == 0


def test_reconnect_drops_from_the_pool_it_added_to():
    """Per-layer pools (a per-layer budget): the drops come from the layer that gained."""
    from tedepr_cli.pruning.reachability import reconnect_within_budget

    model = MLP((4, 6, 3))
    with torch.no_grad():
        for w in model.parameters():
            w.abs_()
    masks = _masks(model, {"layers.0.weight": [(0, 0), (2, 1), (5, 3), (3, 2)],
                           "layers.1.weight": [(0, 0), (1, 4), (0, 3)]})
    gen = torch.Generator().manual_seed(0)
    scores = {n: 1.0 + torch.rand(m.shape, generator=gen) for n, m in masks.items()}
    scores["layers.1.weight"][1, 2] = scores["layers.1.weight"][2, 5] = 9.0  # the reconnecting entries
    scores["layers.0.weight"][3, 2] = 0.1  # the lowest kept entry: unit 3 ... (read by layers.1 (0, 3))
    scores["layers.1.weight"][1, 4] = 0.2  # ... and an entry reading the unreached unit 4
    scores["layers.1.weight"][0, 3] = 0.3
    before = {n: m.clone() for n, m in masks.items()}
    whole = reconnect_within_budget(model, model.input_shape, masks, scores)
    pools = reconnect_within_budget(model, model.input_shape, masks, scores,
                                    pools=[["layers.0.weight"], ["layers.1.weight"]])
    for fixed in (whole, pools):
        assert fixed.reach.outputs_reached == 3 and fixed.added == {"layers.1.weight": 2}
        assert sum(int(m.sum()) for m in fixed.masks.values()) == 7
    assert whole.dropped == {"layers.0.weight": 1, "layers.1.weight": 1}  # the two lowest: 0.1, 0.2
    assert pools.dropped == {"layers.1.weight": 2}  # (1, 4) and (0, 3): layer 1 keeps its count
    assert all(torch.equal(masks[n], before[n]) for n in masks)  # the input masks are left alone


def test_cli_reconnects_cut_outputs_within_the_budget(tmp_path):
    """Dense magnitude pruning of the trained LeNet-300-100 at 99.9 % leaves 5 of its 10 classes
    on no input: by default `prune` swaps entries that reach them in, at the same kept count;
    --no-reconnect keeps the selection and warns."""
    args = ["prune", LENET300, "--arch", "lenet300", "--no-decompose", "--criterion", "magnitude",
            "--sparsity", "0.999"]
    r = run_cli(*args, "-o", tmp_path / "on")
    assert r.exit_code == 0, r.stderr
    assert "reconnect: 5 output(s) were cut off the input" in r.stdout
    assert "(10 of 10 outputs now reached), within the budget" in r.stdout
    m = json.loads((tmp_path / "on" / "manifest.json").read_text())["pruning"]
    assert m["kept"] == m["budget"] and m["repair"]["added"] == m["repair"]["dropped"] >= 1
    assert m["reachability"]["outputs_reached"] == 10
    assert m["repair"]["mode"] == "swap" and m["repair"]["cut_outputs"] == 5
    r = run_cli(*args, "-o", tmp_path / "off", "--no-reconnect")
    assert r.exit_code == 0, r.stderr
    assert "5 of 10 outputs depend on no input" in r.stderr and "--reconnect (swaps" in r.stderr
    assert "5 of 10 outputs depend on no input (constant logits): kept as selected" in r.stdout
    m = json.loads((tmp_path / "off" / "manifest.json").read_text())["pruning"]
    assert m["kept"] == m["budget"] and m["reachability"]["outputs_reached"] == 5
    assert m["repair"]["mode"] == "off"
    r = run_cli(*args, "-o", tmp_path / "add", "--repair-paths")  # beyond the budget instead
    m = json.loads((tmp_path / "add" / "manifest.json").read_text())["pruning"]
    assert m["repair"]["mode"] == "beyond budget" and m["repair"]["cut_outputs"] == 5
    assert m["kept"] == m["budget"] + m["repair"]["added"] and m["reachability"]["outputs_reached"] == 10
    r = run_cli(*args, "-o", tmp_path / "both", "--reconnect", "--repair-paths")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "not both" in r.stderr
    assert not (tmp_path / "both").exists()
