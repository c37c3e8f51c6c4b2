"""`tedepr export`: compact safetensors bit-exact, ONNX validated on every zoo model,
re-validation catches a tampered file, failures leave nothing behind."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from tedepr_cli.arch import build, parse_arch
from tedepr_cli.artifact import Artifact, load_artifact
from tedepr_cli.decompose import DecomposeOptions, decompose
from tedepr_cli.errors import ValidationError
from tedepr_cli.export import ExportOptions, entropy_bytes, export
from tedepr_cli.prune import PruneOptions, prune

from .conftest import MNIST, ZOO_CASES, run_cli


def _pruned(name, fmt="tt", chain="linear", sparsity=0.99):
    torch.manual_seed(0)
    spec = parse_arch(name, json.dumps(ZOO_CASES[name]))
    art = Artifact(model=build(spec).eval(), arch=spec)
    dec, _ = decompose(art, DecomposeOptions(format=fmt, rank=4, init="random", chain=chain, seed=1))
    out, _ = prune(dec, PruneOptions(sparsity=sparsity, criterion="magnitude"))
    return out


# every zoo model in TT; TR on one model per family (deep ResNets only add export time)
CASES = [(n, "tt") for n in sorted(ZOO_CASES)] + [
    (n, "tr") for n in ("lenet300", "lenet5", "lstm", "resnet20", "vgg11", "vit_tiny")]


@pytest.mark.parametrize("name,fmt", CASES)
def test_every_zoo_model_exports_and_validates(name, fmt, tmp_path):
    art = _pruned(name, fmt)
    rep = export(art, tmp_path / "e", ExportOptions(formats=["safetensors", "onnx", "onnx-sparse"]), MNIST)
    assert rep["validation"]["safetensors"]["bit_exact"]
    for f in ("onnx", "onnx-sparse"):
        for b in ("1", "7"):
            c = rep["validation"][f][b]
            assert c["ok"]
    # the file alone reloads bit for bit
    back = load_artifact(tmp_path / "e" / "model.safetensors")
    x = torch.from_numpy(np.load(tmp_path / "e" / "sample_inputs.npy"))
    with torch.no_grad():
        assert torch.equal(back.model(x), art.model(x))
    m = onnx.load(str(tmp_path / "e" / "model.sparse.onnx"))
    assert len(m.graph.sparse_initializer) > 0
    assert all(s.indices.data_type == onnx.TensorProto.INT64 for s in m.graph.sparse_initializer)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # dynamic batch axis


@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
def test_nonlinear_chain_exports_and_validates(name, tmp_path):
    art = _pruned(name, "tt", chain="nonlinear")
    rep = export(art, tmp_path / "e", ExportOptions(formats=["onnx"]), MNIST)
    assert all(c["ok"] for c in rep["validation"]["onnx"].values())


def test_compact_size_target_on_the_sample_pipeline(tmp_path):
    from tedepr_cli.loading import load_model

    from .conftest import LENET300

    art = load_model(LENET300, parse_arch("lenet300"))
    for kw in ({}, {"decompose": False}):
        pruned, _ = prune(art, PruneOptions(sparsity=0.995, criterion="snip", **kw), MNIST)
        rep = export(pruned, tmp_path / f"e{len(kw)}", ExportOptions(formats=["safetensors"]))
        c = rep["compact"]
        assert c["kept_values"] == 1331 and c["ratio"] <= 1.15, c
        assert rep["formats"]["safetensors"]["bytes"] < rep["dense_original"]["bytes"] / 20


def test_entropy_bound():
    assert entropy_bytes(10, 0) == 0 == entropy_bytes(10, 10)
    assert abs(entropy_bytes(4, 2) - np.log2(6) / 8) < 1e-12


def test_perturbed_onnx_fails_revalidation(tmp_path):
    art = _pruned("lenet300")
    out = tmp_path / "e"
    export(art, out, ExportOptions(formats=["onnx"]))
    assert run_cli("validate", out).exit_code == 0
    m = onnx.load(str(out / "model.onnx"))
    init = max(m.graph.initializer, key=lambda i: int(np.prod(i.dims)))
    arr = numpy_helper.to_array(init).copy()
    arr.reshape(-1)[np.flatnonzero(arr)[:5]] *= 1.5
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(m, str(out / "model.onnx"))
    r = run_cli("validate", out)
    assert r.exit_code == 8 and "model.onnx" in r.stderr


def test_validation_miss_writes_nothing(tmp_path, monkeypatch):
    import tedepr_cli.export as E

    monkeypatch.setattr(E, "run_onnx", lambda path, x, device="cpu": np.zeros((len(x), 10), np.float32))
    with pytest.raises(ValidationError, match="differs from PyTorch"):
        export(_pruned("lenet300"), tmp_path / "e", ExportOptions(formats=["safetensors", "onnx"]))
    assert list(tmp_path.iterdir()) == []


def test_cli_export_table_and_errors(tmp_path):
    from tedepr_cli.artifact import save_artifact

    src = save_artifact(_pruned("lenet300"), tmp_path / "p")
    r = run_cli("export", src, "--to", "safetensors,onnx,onnx-sparse", "-o", tmp_path / "e")
    assert r.exit_code == 0, r.stderr
    for word in ("dense original", "safetensors", "onnx-sparse", "validated onnx", "bit-exact = True"):
        assert word in r.stdout
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == [
        "export.json", "model.onnx", "model.safetensors", "model.sparse.onnx", "sample_inputs.npy",
        "sample_outputs.npy"]
    assert run_cli("export", src, "-o", tmp_path / "e").exit_code == 6
    assert run_cli("export", src, "-o", tmp_path / "f", "--opset", "9").exit_code == 2
    assert run_cli("export", src, "-o", tmp_path / "f", "--to", "tflite").exit_code == 2
    assert not (tmp_path / "f").exists()
    r = run_cli("export", src, "-o", tmp_path / "g", "--to", "onnx", "--json")
    d = json.loads(r.stdout)
    assert d["formats"]["onnx"]["bytes"] > 0 and d["validation"]["onnx"]["7"]["ok"]
