"""Issue 18: models nobody here wrote (torch's own Transformer, bidirectional LSTM, GRU,
torchvision-style ResNet-18 / VGG-11-BN, tied weights, token-id models) through every
command, via the CLI with ``--arch pkg.module:callable`` (tests/foreign_models.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from tedepr_cli.arch import build, parse_arch
from tedepr_cli.artifact import load_artifact

from . import foreign_models as fm
from .conftest import run_cli

MOD = "tests.foreign_models"

SHAPES = {"transformer": (8, 16), "lstm": (8, 16), "gru": (8, 16), "tied": (64,),
          "resnet18": (3, 32, 32), "vgg11_bn": (3, 32, 32)}


def _checkpoint(tmp_path, name: str):
    torch.manual_seed(0)
    model = getattr(fm, name)()
    path = tmp_path / f"{name}.pt"
    torch.save(model.state_dict(), path)
    return path


def _data(tmp_path, shape, n: int = 96, seed: int = 0):
    rng = np.random.default_rng(seed)
    path = tmp_path / "data.npz"
    np.savez(path, x=rng.standard_normal((n, *shape)).astype("float32"), y=rng.integers(0, 10, n))
    return path


def _ok(res, what: str):
    assert res.exit_code == 0, f"{what}: exit {res.exit_code}: {res.stderr}"
    assert "internal error" not in res.stderr


# ---------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("name", list(SHAPES))
def test_pipeline_end_to_end(tmp_path, name):
    """decompose -> prune -> finetune -> export (ONNX validated) -> validate -> plan ->
    bench, each through the CLI with the import-path architecture."""
    ckpt, data = _checkpoint(tmp_path, name), _data(tmp_path, SHAPES[name])
    arch = ["--arch", f"{MOD}:{name}"]
    dec, pr, ft, ex = (tmp_path / s for s in ("dec", "pr", "ft", "ex"))
    _ok(run_cli("decompose", ckpt, *arch, "-o", dec), "decompose")
    _ok(run_cli("prune", dec, "--sparsity", "0.8", "--data", data, "--batch-size", "16", *arch, "-o", pr),
        "prune")
    _ok(run_cli("finetune", pr, "--data", data, "--epochs", "1", "--limit-train", "32", "--batch-size", "16",
                *arch, "-o", ft), "finetune")
    _ok(run_cli("export", ft, *arch, "-o", ex), "export")
    report = json.loads((ex / "export.json").read_text())
    assert report["validation"]["onnx"]["1"]["ok"] and report["validation"]["onnx"]["7"]["ok"]
    assert report["validation"]["safetensors"]["bit_exact"]
    # the artifact-only commands refuse the import path unless it is named again ...
    res = run_cli("validate", ex)
    assert res.exit_code == 5 and f"--arch {MOD}:{name}" in res.stderr
    # ... and accept it when it is
    _ok(run_cli("validate", ex, *arch), "validate")
    _ok(run_cli("plan", ft, "--batch", "1", *arch, "-o", tmp_path / "planned"), "plan")
    _ok(run_cli("bench", ex, "--iters", "3", "--warmup", "1", "--batch", "1", "--no-memory",
                "--engines", "dense-torch,chain-torch,chain-ort", *arch), "bench")


# ---------------------------------------------------------------------------- item 1: --arch
def test_module_input_shape_is_honoured():
    """resnet18 sets no model.input_shape: the module-level one applies; --input-shape wins."""
    assert build(parse_arch(f"{MOD}:resnet18"), allow_import=True).input_shape == fm.input_shape
    assert build(parse_arch(f"{MOD}:resnet18", None, "3,64,64"), allow_import=True).input_shape == (3, 64, 64)


def test_arch_module_in_the_working_directory(tmp_path, monkeypatch):
    """`--arch mynet:build` finds mynet.py in the current directory (a console script's
    sys.path lacks it), and sys.path is left as it was."""
    import sys

    (tmp_path / "mynet_issue18.py").write_text(
        "import torch\ninput_shape = (6,)\ndef build():\n    return torch.nn.Sequential("
        "torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = list(sys.path)
    model = build(parse_arch("mynet_issue18:build"), allow_import=True)
    assert model.input_shape == (6,)
    assert sys.path == before


# ---------------------------------------------------------------------------- item 2: drop-in MHA
def test_tensorized_mha_is_drop_in_for_torch_encoder_layer():
    """torch's TransformerEncoderLayer reads in_proj_bias/in_proj_weight/out_proj on its fast
    path: the tensorized attention answers them (the dense equivalents of its chains), and
    the encoder (eval, no grad) computes what the dense encoder with those weights computes."""
    import copy

    from tedepr_cli.decompose import DecomposeOptions, tensorize_model
    from tedepr_cli.tensorized.wrappers import TensorizedMHA

    torch.manual_seed(0)
    model = fm.transformer().eval()
    reference = copy.deepcopy(model)
    tensorize_model(model, (8, 16), DecomposeOptions(rank=4, include=["encoder.layers.*.self_attn"]))
    model.eval()
    with torch.no_grad():
        for i, layer in enumerate(model.encoder.layers):
            attn = layer.self_attn
            assert isinstance(attn, TensorizedMHA) and attn.in_proj_weight.shape == (96, 32)
            dense = reference.encoder.layers[i].self_attn
            dense.in_proj_weight.copy_(attn.in_proj_weight)
            dense.in_proj_bias.copy_(attn.in_proj_bias)
            dense.out_proj.weight.copy_(attn.out_proj.weight)
            dense.out_proj.bias.copy_(attn.out_proj.bias)
        x = torch.randn(3, 8, 16)
        out, ref = model(x), reference(x)  # the reference takes torch's fused fast path
    assert torch.allclose(out, ref, atol=1e-5)
    model.train()
    model(x).sum().backward()  # and it trains (slow path, dropout on the attention weights)


def test_dense_prune_of_torch_encoder_scores_through_fused_attention(tmp_path):
    """The tedepr criterion differentiates twice; the fused SDPA kernel cannot: scoring runs
    on the math backend, and the global backend choice is restored."""
    from torch.backends.cuda import math_sdp_enabled

    ckpt, data = _checkpoint(tmp_path, "transformer"), _data(tmp_path, (8, 16))
    res = run_cli("prune", ckpt, "--arch", f"{MOD}:transformer", "--no-decompose", "--sparsity", "0.9",
                  "--data", data, "--batch-size", "16", "-o", tmp_path / "p", "--json")
    _ok(res, "prune")
    assert json.loads(res.stdout)["criterion"] == "tedepr"
    assert math_sdp_enabled()


# ---------------------------------------------------------------------------- item 3: every layer
def test_untensorized_layers_get_a_plan_row_and_are_pruned_dense(tmp_path):
    ckpt = _checkpoint(tmp_path, "text")
    res = run_cli("decompose", ckpt, "--arch", f"{MOD}:text", "-o", tmp_path / "d", "--json")
    _ok(res, "decompose")
    rows = {r["name"]: r for r in json.loads(res.stdout)["layers"]}
    assert rows["embed"]["tensorized"] and rows["embed"]["type"] == "embedding"  # a TT-embedding (item 6)
    assert not rows["conv"]["tensorized"] and "Conv1d" in rows["conv"]["note"]
    gru = _checkpoint(tmp_path, "gru")
    res = run_cli("decompose", gru, "--arch", f"{MOD}:gru", "-o", tmp_path / "g", "--json")
    rows = {r["name"]: r for r in json.loads(res.stdout)["layers"]}
    assert "GRU" in rows["rnn"]["note"] and rows["rnn"]["params"] == sum(
        p.numel() for n, p in fm.gru().rnn.named_parameters() if n.startswith("weight"))
    # pruned as dense weights, and the report says what share of the whole model that is
    res = run_cli("prune", ckpt, "--arch", f"{MOD}:text", "--no-decompose", "--sparsity", "0.9",
                  "--criterion", "magnitude", "-o", tmp_path / "p", "--json")
    _ok(res, "prune")
    rep = json.loads(res.stdout)
    names = {r["name"] for r in rep["layers"]}
    assert "conv" in names and "embed" not in names
    total = sum(p.numel() for p in fm.text().parameters())
    assert rep["coverage"]["prunable_share"] == pytest.approx(rep["prunable_entries"] / total)
    assert rep["coverage"]["not_pruned"] == {"embed.weight": 50 * 32}
    res = run_cli("prune", gru, "--arch", f"{MOD}:gru", "--no-decompose", "--sparsity", "0.9",
                  "--criterion", "magnitude", "-o", tmp_path / "pg", "--json")
    pruned = {r["name"] for r in json.loads(res.stdout)["layers"]}
    assert {"rnn.weight_ih_l0", "rnn.weight_hh_l1_reverse"} <= pruned


def test_forward_failing_on_the_input_shape_is_bad_input(tmp_path):
    """vgg11_bn on 28x28: five max-pools leave nothing ("Output size is too small")."""
    ckpt = _checkpoint(tmp_path, "vgg11_bn")
    res = run_cli("decompose", ckpt, "--arch", f"{MOD}:vgg11_bn", "--input-shape", "3,28,28",
                  "-o", tmp_path / "d")
    assert res.exit_code == 4, res.stderr
    assert "3x28x28" in res.stderr and "MaxPool2d" in res.stderr and "internal error" not in res.stderr
    assert not (tmp_path / "d").exists()


def test_token_models_get_token_ids_in_dry_runs(tmp_path):
    """A model that starts with nn.Embedding: decompose, data-free prune, export (random
    token ids, validated) and bench run, where float zeros failed in the embedding."""
    from tedepr_cli.surgery import example_input

    model = fm.text()
    x = example_input(model, (12,), 4, "rand", torch.Generator().manual_seed(0))
    assert x.dtype == torch.int64 and int(x.min()) >= 0 and int(x.max()) < 50
    assert example_input(nn.Linear(3, 2), (3,)).dtype == torch.float32
    ckpt, arch = _checkpoint(tmp_path, "text"), ["--arch", f"{MOD}:text"]
    _ok(run_cli("decompose", ckpt, *arch, "-o", tmp_path / "d"), "decompose")
    _ok(run_cli("prune", tmp_path / "d", *arch, "--sparsity", "0.8", "-o", tmp_path / "p"), "prune")
    _ok(run_cli("export", tmp_path / "p", *arch, "-o", tmp_path / "e"), "export")
    assert json.loads((tmp_path / "e" / "export.json").read_text())["inputs"]["source"] == "random token ids"
    _ok(run_cli("bench", tmp_path / "e", *arch, "--iters", "2", "--warmup", "1", "--batch", "1",
                "--no-memory", "--engines", "dense-torch,chain-torch"), "bench")
    # integer ids as --data feed prune's scoring and eval (tests/test_tokens.py: token .npz files)
    rng = np.random.default_rng(0)
    data = tmp_path / "tokens.npz"
    np.savez(data, x=rng.integers(0, 50, (32, 12)), y=rng.integers(0, 10, 32))
    _ok(run_cli("prune", tmp_path / "d", "--sparsity", "0.8", "--data", data, "-o", tmp_path / "p2", *arch),
        "prune --data")
    _ok(run_cli("eval", tmp_path / "p2", "--data", data, *arch), "eval")


# ---------------------------------------------------------------------------- item 4: ties
def test_tied_weights_pruned_once_counted_once_stored_once_retied(tmp_path):
    from safetensors import safe_open

    from tedepr_cli.masks import tied_parameters
    from tedepr_cli.storage import is_packed, ties_of, unpack

    ckpt, data = _checkpoint(tmp_path, "tied"), _data(tmp_path, (64,))
    arch = ["--arch", f"{MOD}:tied"]
    res = run_cli("prune", ckpt, *arch, "--no-decompose", "--sparsity", "0.9", "--data", data,
                  "--batch-size", "16", "-o", tmp_path / "p", "--json")
    _ok(res, "prune")
    rep = json.loads(res.stdout)
    assert rep["dense_prunable"] == 64 * 48 + 48 * 48 + 48 * 10  # the tied 48x48 counted once
    assert [r["name"] for r in rep["layers"]] == ["inp", "a", "head"]
    with safe_open(str(tmp_path / "p" / "model.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        enc = json.loads(f.metadata()["tedepr.encoding"])
    parts, per_tensor = unpack(stored, enc) if is_packed(enc) else (stored, enc)
    assert not any(k.startswith("b.weight") for k in parts)  # stored once
    assert per_tensor["b.weight"] == {"layout": "tied", "to": "a.weight"}
    assert ties_of(enc) == {"b.weight": "a.weight"}
    art = load_artifact(tmp_path / "p", allow_import=f"{MOD}:tied")
    m = art.model
    assert m.a.parametrizations.weight.original is m.b.parametrizations.weight.original  # re-tied
    assert torch.equal(m.a.weight, m.b.weight) and tied_parameters(m) == {"b.weight": "a.weight"}
    assert list(art.masks) == ["inp.weight", "a.weight", "head.weight"]  # one mask
    assert torch.equal(m.b.parametrizations.weight[0].mask, art.masks["a.weight"])
    # fine-tuning keeps the pair tied and the pruned entries zero in both layers
    _ok(run_cli("finetune", tmp_path / "p", "--data", data, "--epochs", "1", "--limit-train", "32", *arch,
                "-o", tmp_path / "ft"), "finetune")
    back = load_artifact(tmp_path / "ft", allow_import=f"{MOD}:tied").model
    assert back.a.parametrizations.weight.original is back.b.parametrizations.weight.original
    assert bool((back.b.weight[~art.masks["a.weight"]] == 0).all())


def test_prune_in_memory_masks_every_user_of_a_tied_tensor():
    """The one mask rides on both layers: a training step through either keeps the pruned
    entries exactly zero (no gradient reaches them through the second layer)."""
    import tedepr_cli as tedepr

    torch.manual_seed(0)
    model = fm.tied()
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    tedepr.prune(model, sparsity=0.9, criterion="magnitude")
    mask = tedepr.get_masks(model)["a.weight"]
    assert list(tedepr.get_masks(model)) == ["inp.weight", "a.weight", "head.weight"]
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    original = model.a.parametrizations.weight.original
    assert original is model.b.parametrizations.weight.original
    assert bool((original[~mask] == 0).all()) and bool((model.b.weight[~mask] == 0).all())


def test_artifact_reties_for_an_architecture_that_does_not_tie(tmp_path):
    """An artifact stores a tie the architecture does not make itself: loading ties again."""
    from tedepr_cli.arch import ArchSpec
    from tedepr_cli.artifact import Artifact, save_artifact

    torch.manual_seed(0)
    art = Artifact(model=build(parse_arch(f"{MOD}:tied"), allow_import=True), arch=ArchSpec(f"{MOD}:untied"))
    save_artifact(art, tmp_path / "a")
    back = load_artifact(tmp_path / "a", allow_import=f"{MOD}:untied").model
    assert back.a.weight is back.b.weight and torch.equal(back.b.weight, art.model.a.weight)


def test_decompose_keeps_ties(tmp_path):
    ckpt = _checkpoint(tmp_path, "tied")
    res = run_cli("decompose", ckpt, "--arch", f"{MOD}:tied", "-o", tmp_path / "d", "--json")
    _ok(res, "decompose")
    rows = {r["name"]: r for r in json.loads(res.stdout)["layers"]}
    assert not rows["a"]["tensorized"] and "tied" in rows["a"]["note"]
    assert not rows["b"]["tensorized"] and rows["inp"]["tensorized"]
    m = load_artifact(tmp_path / "d", allow_import=f"{MOD}:tied").model
    assert m.a.weight is m.b.weight
    res = run_cli("decompose", ckpt, "--arch", f"{MOD}:tied", "--include", "b", "-o", tmp_path / "d2")
    assert res.exit_code == 4 and "tied" in res.stderr


def test_checkpoint_storing_a_tied_tensor_once_loads(tmp_path):
    """A checkpoint that stores the tied tensor under one name (as Hugging Face does) fills
    the other name from the model's own tie."""
    from tedepr_cli.loading import load_model

    torch.manual_seed(0)
    state = fm.tied().state_dict()
    del state["b.weight"]
    torch.save(state, tmp_path / "once.pt")
    art = load_model(tmp_path / "once.pt", parse_arch(f"{MOD}:tied"))
    assert torch.equal(art.model.b.weight, state["a.weight"])


# ---------------------------------------------------------------------------- item 5: loading
def test_non_strict_load_lists_keys(tmp_path):
    torch.manual_seed(0)
    state = fm.transformer().state_dict()
    state["embeddings.position_ids"] = torch.arange(8)
    torch.save(state, tmp_path / "extra.pt")
    arch = ["--arch", f"{MOD}:transformer"]
    res = run_cli("decompose", tmp_path / "extra.pt", *arch, "-o", tmp_path / "d")
    assert res.exit_code == 4 and "embeddings.position_ids" in res.stderr and "--non-strict" in res.stderr
    res = run_cli("decompose", tmp_path / "extra.pt", *arch, "--non-strict", "-o", tmp_path / "d")
    _ok(res, "decompose --non-strict")
    assert "embeddings.position_ids" in res.stderr
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["origin"]["keys"] == {"missing": [], "unexpected": ["embeddings.position_ids"]}
    del state["head.bias"]  # mis-shaped keys are refused either way; missing ones listed
    torch.save(state, tmp_path / "missing.pt")
    res = run_cli("info", tmp_path / "missing.pt", *arch, "--non-strict")
    _ok(res, "info")
    assert "head.bias" in res.stderr


def test_hugging_face_folder_says_how_to_load_it(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "hf-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in fm.transformer().state_dict().items()},
              str(folder / "model.safetensors"))
    res = run_cli("decompose", folder, "-o", tmp_path / "d")
    assert res.exit_code == 4 and "Hugging Face" in res.stderr and "--arch" in res.stderr
    _ok(run_cli("decompose", folder, "--arch", f"{MOD}:transformer", "-o", tmp_path / "d"), "decompose")


def test_pickled_module_and_program_decompose_or_say_why(tmp_path):
    """A trusted pickled module whose class builds it with no arguments decomposes (the
    architecture is recovered); one that needs arguments, and a .pt2 program, say which
    --arch to pass; a static-batch program is bad input."""
    torch.manual_seed(0)
    vgg = fm.VGG().eval()
    vgg.input_shape = (3, 32, 32)
    torch.save(vgg, tmp_path / "vgg.pt")
    res = run_cli("decompose", tmp_path / "vgg.pt", "--trust-pickle", "-o", tmp_path / "d")
    _ok(res, "decompose")
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["arch"]["name"] == f"{MOD}:VGG"
    resnet = fm.resnet18().eval()
    resnet.input_shape = (3, 32, 32)
    torch.save(resnet, tmp_path / "resnet.pt")
    res = run_cli("decompose", tmp_path / "resnet.pt", "--trust-pickle", "-o", tmp_path / "d2")
    assert res.exit_code == 4 and "--arch samples.bring_your_own.resnet18:ResNet" in res.stderr
    ep = torch.export.export(resnet, (torch.zeros(1, 3, 32, 32),))
    torch.export.save(ep, tmp_path / "prog.pt2")
    res = run_cli("decompose", tmp_path / "prog.pt2", "-o", tmp_path / "d3")
    assert res.exit_code == 4 and "torch.export program" in res.stderr and "--arch" in res.stderr
    res = run_cli("export", tmp_path / "prog.pt2", "-o", tmp_path / "e")
    assert res.exit_code == 4 and "static batch size of 1" in res.stderr
    _ok(run_cli("decompose", tmp_path / "prog.pt2", "--arch", f"{MOD}:resnet18", "-o", tmp_path / "d4"),
        "decompose .pt2 --arch")


def test_bench_memory_probes_take_the_confirmed_import_path(tmp_path):
    """bench --arch pkg.module:callable measures peak memory in fresh processes, which
    reload the artifact: they take the trust the user gave (was: every probe refused the
    import path, 'not measured')."""
    ckpt = _checkpoint(tmp_path, "untied")
    arch = ["--arch", f"{MOD}:untied"]
    _ok(run_cli("prune", ckpt, "--sparsity", "0.9", *arch, "-o", tmp_path / "pr"), "prune")
    res = run_cli("bench", tmp_path / "pr", "--iters", "2", "--warmup", "1", "--batch", "1", "--engines",
                  "dense-torch,chain-torch", "--json", *arch)
    _ok(res, "bench")
    d = json.loads(res.stdout)
    assert not [w for w in d["warnings"] if "not measured" in w], d["warnings"]
    assert all(r["peak_memory_bytes"] is not None for r in d["results"]["1"].values())
