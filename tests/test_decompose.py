"""`tedepr decompose`: every zoo model, the planner's choices, the CLI, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from tedepr_cli.arch import parse_arch
from tedepr_cli.artifact import load_artifact, save_artifact
from tedepr_cli.decompose import DecomposeOptions, decompose
from tedepr_cli.errors import BadInput, UsageError
from tedepr_cli.loading import load_model
from tedepr_cli.tensorized.layers import is_tensorized
from tedepr_cli.tensorized.plan import PlanOptions, densify, plan_model
from tedepr_cli.zoo import MODELS

from .conftest import LENET300, MNIST, ZOO_CASES, run_cli, sample_inputs


def _art(name, **extra):
    torch.manual_seed(0)
    kwargs = {**ZOO_CASES[name], **extra}
    spec = parse_arch(name, json.dumps(kwargs))
    from tedepr_cli.arch import build
    from tedepr_cli.artifact import Artifact

    return Artifact(model=build(spec).eval(), arch=spec)


@pytest.mark.parametrize("fmt", ["tt", "tr"])
@pytest.mark.parametrize("name", sorted(ZOO_CASES))
def test_every_zoo_model_chain_equals_dense_equivalent(name, fmt, tmp_path):
    extra = {"attn": "mha"} if name == "vit_tiny" and fmt == "tr" else {}
    art = _art(name, **extra)
    out, report = decompose(art, DecomposeOptions(format=fmt, rank=3, init="random", seed=1))
    assert any(r["tensorized"] for r in report)
    model = out.model.double().eval()
    ref_model = densify(model).eval()
    from tedepr_cli.tensorized.base import TensorizedLayer

    assert not any(isinstance(m, TensorizedLayer) for m in ref_model.modules())
    x, _ = sample_inputs(model, 4)
    with torch.no_grad():
        y, ref = model(x.double()), ref_model(x.double())
    assert float((y - ref).norm() / ref.norm()) <= 1e-5
    # the artifact rebuilds the same tensorized model without pickles
    out.model.float()
    path = save_artifact(out, tmp_path / "a")
    back = load_artifact(path)
    with torch.no_grad():
        assert torch.equal(back.model(x), out.model(x))
    assert sum(is_tensorized(m) for m in back.model.modules()) == \
        sum(is_tensorized(m) for m in out.model.modules())


@pytest.mark.parametrize("fmt", ["tt", "tr"])
def test_pretrained_full_rank_reconstructs_sample_checkpoint(fmt):
    from tedepr_cli.tensorized.decomp import decompose_into
    from tedepr_cli.tensorized.layers import build_layer
    from tedepr_cli.tensorized.plan import chain_dims, factorize, full_rank, ranks_for

    art = load_model(LENET300, parse_arch("lenet300"))
    for lin in (art.model.fc1, art.model.fc2, art.model.fc3):
        spec = {"type": "linear", "format": fmt, "in_modes": list(factorize(lin.in_features, 2)),
                "out_modes": list(factorize(lin.out_features, 2)), "bias": True}
        dims = chain_dims(spec)
        spec["ranks"] = ranks_for(dims, full_rank(dims), ring=False)
        layer = build_layer(spec)
        assert decompose_into(layer, lin.weight) <= 1e-5


def test_pretrained_decomposition_keeps_low_rank_structure():
    """A checkpoint whose weights are exactly TT rank 4 is recovered by --init pretrained."""
    art = _art("lenet300")
    src, _ = decompose(art, DecomposeOptions(rank=4, init="random", seed=3))
    art.model = densify(src.model)
    out, report = decompose(art, DecomposeOptions(rank=4))
    assert max(r["rel_error"] for r in report if r["tensorized"]) <= 1e-5


def test_defaults_follow_the_literature():
    plans = {p.name: p for p in plan_model(MODELS.get("resnet20")(), (3, 32, 32), PlanOptions())}
    assert plans["conv1"].spec is None and "stem" in plans["conv1"].note
    assert plans["layer1.0.conv1"].spec["type"] == "conv2d"
    assert plans["fc"].spec is not None
    plans = plan_model(MODELS.get("vit_tiny")(attn="mha"), (1, 28, 28), PlanOptions())
    assert {p.spec["type"] for p in plans if p.spec} == {"linear", "mha"}


def test_compression_target_is_met_per_layer():
    model = MODELS.get("lenet300")()
    for p in plan_model(model, (784,), PlanOptions(rank=None, compression=20)):
        if p.spec:
            assert p.dense_params / p.params >= 20


def test_auto_modes_never_pick_more_work_than_needed():
    model = MODELS.get("lenet300")()
    auto = {p.name: p for p in plan_model(model, (784,), PlanOptions(rank=8))}
    for d in (3, 4):
        fixed = {p.name: p for p in plan_model(model, (784,), PlanOptions(rank=8, modes=d))}
        for name, p in auto.items():
            if p.spec and fixed[name].spec:
                assert p.work_ratio <= fixed[name].work_ratio


def test_rank_overrides_and_bad_ranks():
    model = MODELS.get("lenet300")()
    plans = {p.name: p for p in plan_model(model, (784,), PlanOptions(rank=8, rank_overrides={"fc1": 2}))}
    assert plans["fc1"].spec["ranks"] == [1, 2, 1] and plans["fc2"].spec["ranks"] == [1, 8, 1]
    with pytest.raises(UsageError):
        plan_model(model, (784,), PlanOptions(rank=0))
    with pytest.raises(BadInput, match="full rank"):
        plan_model(model, (784,), PlanOptions(rank=5000, modes=2))
    with pytest.raises(BadInput, match="no layer matches"):
        plan_model(model, (784,), PlanOptions(rank_overrides={"nope": 3}))


def test_format_overrides_give_convs_tensor_rings_and_survive_a_save(tmp_path):
    from tedepr_cli.tensorized.tr import TRConv2d
    from tedepr_cli.tensorized.tt import TTLinear

    model = MODELS.get("lenet5")()
    opts = PlanOptions(rank=3, format_overrides={"conv*": "tr"})
    plans = {p.name: p.spec for p in plan_model(model, (1, 28, 28), opts) if p.spec}
    assert plans["conv2"]["format"] == "tr" and set(plans["conv2"]["ranks"]) == {3}  # a ring
    assert plans["fc1"]["format"] == plans["fc2"]["format"] == "tt" and plans["fc1"]["ranks"] == [1, 3, 1]
    out, _ = decompose(_art("lenet5"), DecomposeOptions(rank=3, format_overrides={"conv*": "tr"},
                                                        init="random"))
    assert isinstance(out.model.conv2, TRConv2d) and isinstance(out.model.fc1, TTLinear)
    assert out.meta["tensorization"]["format_overrides"] == {"conv*": "tr"}
    back = load_artifact(save_artifact(out, tmp_path / "a"))
    assert isinstance(back.model.conv2, TRConv2d) and isinstance(back.model.fc1, TTLinear)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(back.model(x), out.model(x))
    with pytest.raises(UsageError, match="format"):
        plan_model(model, (1, 28, 28), PlanOptions(format_overrides={"conv2": "cp"}))
    with pytest.raises(BadInput, match="no layer matches"):
        plan_model(model, (1, 28, 28), PlanOptions(format_overrides={"nope": "tr"}))


def test_include_of_unsupported_layer_is_an_error():
    with pytest.raises(BadInput, match="BatchNorm2d"):
        plan_model(MODELS.get("resnet20")(), (3, 32, 32), PlanOptions(include=["bn1"]))
    with pytest.raises(BadInput, match="no layer to tensorize"):
        plan_model(MODELS.get("lenet300")(), (784,), PlanOptions(exclude=["*"]))


def test_decompose_twice_is_refused():
    art = _art("lenet300")
    out, _ = decompose(art, DecomposeOptions())
    with pytest.raises(BadInput, match="already decomposed"):
        decompose(out, DecomposeOptions())


# ---------------------------------------------------------------------------- CLI
def test_cli_decompose_sample_end_to_end(tmp_path):
    out = tmp_path / "dec"
    r = run_cli("decompose", LENET300, "--arch", "lenet300", "--rank", "8", "--rank", "fc3=4",
                "--data", MNIST, "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["summary"]["params_before"] == 266_610 and d["summary"]["layers_tensorized"] == 3
    assert 0 <= d["summary"]["accuracy_after"] <= 1
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["tensorization"]["layers"]) == {"fc1", "fc2", "fc3"}
    assert m["tensorization"]["layers"]["fc3"]["ranks"] == [1, 4, 1]
    assert m["history"][-1]["command"] == "decompose"
    r = run_cli("info", out)
    assert r.exit_code == 0 and "TTLinear" in r.stdout
    r = run_cli("decompose", LENET300, "--arch", "lenet300", "-o", tmp_path / "tr", "--format", "tr")
    assert r.exit_code == 0 and "tensorization plan" in r.stdout


def test_cli_per_layer_format(tmp_path):
    """``--format tt --format 'fc1=tr'``: fc1 becomes a tensor ring, the others stay TT; the same
    on prune's one-shot decomposition (``--format 'fc*=tr'``)."""
    r = run_cli("decompose", LENET300, "--arch", "lenet300", "--rank", "3", "--format", "tt",
                "--format", "fc1=tr", "-o", tmp_path / "d")
    assert r.exit_code == 0, r.stderr
    layers = json.loads((tmp_path / "d" / "manifest.json").read_text())["tensorization"]["layers"]
    assert {n: s["format"] for n, s in layers.items()} == {"fc1": "tr", "fc2": "tt", "fc3": "tt"}
    r = run_cli("prune", "lenet300", "--init", "random", "--sparsity", "0.99", "--criterion", "magnitude",
                "--format", "fc[12]=tr", "-o", tmp_path / "p")
    assert r.exit_code == 0, r.stderr
    layers = json.loads((tmp_path / "p" / "manifest.json").read_text())["tensorization"]["layers"]
    assert {n: s["format"] for n, s in layers.items()} == {"fc1": "tr", "fc2": "tr", "fc3": "tt"}


@pytest.mark.parametrize("args,code", [
    (["--rank", "0"], 2),
    (["--rank", "x"], 2),
    (["--format", "cp"], 2),
    (["--format", "fc1=cp"], 2),
    (["--format", "tt", "--format", "tr"], 2),
    (["--format", "nope=tr"], 4),
    (["--modes", "fc1=28x27:15x20"], 4),
    (["--modes", "5000"], 2),
    (["--rank", "5000", "--modes", "2"], 4),
    (["--include", "nope*"], 4),
    (["--rank", "4", "--compression", "10"], 2),
    (["--compression", "0.5"], 2),
    (["--init", "magic"], 2),
])
def test_cli_bad_options_write_nothing(tmp_path, args, code):
    out = tmp_path / "o"
    r = run_cli("decompose", LENET300, "--arch", "lenet300", "-o", out, *args)
    assert r.exit_code == code, (r.stdout, r.stderr)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert "Traceback" not in r.stderr
