"""The compressed ONNX's sparse path (``onnx-fast``): one ``TedeprChain`` node per compressed
layer, run by the compiled kernel where the custom-op library is registered and by its
standard-op function body everywhere else; both equal the torch model."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import tedepr_cli as tedepr
from tedepr_cli.export import ExportOptions, export, to_onnx
from tedepr_cli.kernels import ort_ops
from tedepr_cli.masks import folded_copy

from .conftest import MNIST


def _compressed(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv":
        net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 12, 3, stride=2))
        x = torch.rand(1, 8, 10, 10)
    else:
        net = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 36))
        x = torch.rand(1, 64)
    fmt = "tr" if kind == "tr" else "tt"
    model = tedepr.tensorize(net, format=fmt, rank=4, init="random", example_input=x)
    tedepr.prune(model, sparsity=0.6, criterion="magnitude")
    return model.eval()


def _fast_proto(model: nn.Module):
    folded = folded_copy(model).eval()
    proto = to_onnx(folded, torch.rand(3, *model.input_shape), 18, strip=False)
    rows = ort_ops.add_sparse_path(proto, folded)
    return proto, rows, folded


def _scaled_error(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("kind", ["tt", "tr", "conv"])
def test_kernel_op_runs_and_equals_torch(kind):
    model = _compressed(kind)
    proto, rows, folded = _fast_proto(model)
    assert rows and all(r["ok"] for r in rows), rows
    assert {r["kind"] for r in rows} == {"conv" if kind == "conv" else "linear"}
    assert sum(n.op_type == ort_ops.OP_TYPE for n in proto.graph.node) == len(rows)
    onnx.checker.check_model(proto, full_check=True)
    ref64 = copy.deepcopy(folded).double()
    keys = {a.s.decode() for n in proto.graph.node for a in n.attribute if a.name == "key"}
    ort_ops._cache.clear()
    sess = ort_ops.session(proto.SerializeToString(), sparse=True)
    for b in (1, 5, 32):  # none of them the traced batch (3)
        x = torch.rand(b, *model.input_shape, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            ref = ref64(x.double()).numpy()
        assert ref.std() > 1e-3 * np.abs(ref).max()  # a real output, not a constant
        y = sess.run(None, {"x": x.numpy()})[0]
        assert _scaled_error(y, ref) <= 1e-4
    # the custom-op kernel ran for every layer (each decodes its packed layer once)
    assert set(ort_ops._cache) == keys


@pytest.mark.parametrize("kind", ["tt", "conv"])
def test_file_runs_with_standard_ops_where_the_library_is_absent(kind, tmp_path):
    """A process that only has onnxruntime (no tedepr, no onnxruntime-extensions import)
    runs the file: onnxruntime inlines each TedeprChain's function body."""
    model = _compressed(kind)
    proto, rows, folded = _fast_proto(model)
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    x = torch.rand(4, *model.input_shape, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "x.npy", x.numpy())
    code = ("import sys, numpy as np, onnxruntime as ort\n"
            "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
            "np.save(sys.argv[3], s.run(None, {'x': np.load(sys.argv[2])})[0])\n"
            "assert 'tedepr_cli' not in sys.modules and 'onnxruntime_extensions' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                   check=True, capture_output=True, timeout=120)
    with torch.no_grad():
        ref = copy.deepcopy(folded).double()(x.double()).numpy()
    assert _scaled_error(np.load(tmp_path / "y.npy"), ref) <= 1e-4
    # and here, in-process, with the library left out: same function bodies, no kernel call
    ort_ops._cache.clear()
    y = ort_ops.session(path, sparse=False).run(None, {"x": x.numpy()})[0]
    assert _scaled_error(y, ref) <= 1e-4 and not ort_ops._cache


def test_payload_is_deterministic_and_a_tampered_one_is_refused():
    model = _compressed("tt")
    folded = folded_copy(model).eval()
    layer = next(m for m in folded.modules() if ort_ops.pack_layer(m) is not None)
    a, b = ort_ops.pack_layer(layer), ort_ops.pack_layer(copy.deepcopy(layer))
    assert a == b
    with pytest.raises(ValueError):
        ort_ops._decode(ort_ops._encode({}, {})[:-4] + "AAAA")  # wrong magic/size is refused
    raw = bytearray(ort_ops.base64.b64decode(a["chain"]))
    raw[-1] ^= 0xFF  # one changed value: its hash is no longer the key
    bad = dict(a, chain=ort_ops.base64.b64encode(bytes(raw)).decode())
    ort_ops._cache.pop(a["key"], None)
    x = np.zeros((1, layer.in_features), np.float32)
    with pytest.raises(ValueError, match="does not match its key"):
        ort_ops.run_node(x, **bad)
    # inside onnxruntime the op must not raise (that would terminate the process): NaNs instead
    assert np.isnan(ort_ops._compute(x, **bad)).all()
    assert any("does not match its key" in e for e in ort_ops.errors)


def test_a_tampered_file_fails_validation_instead_of_crashing(tmp_path):
    from tedepr_cli.export import compare, run_onnx

    model = _compressed("tt")
    proto, rows, folded = _fast_proto(model)
    node = next(n for n in proto.graph.node if n.op_type == ort_ops.OP_TYPE)
    attr = next(a for a in node.attribute if a.name == "chain")
    raw = bytearray(ort_ops.base64.b64decode(attr.s))
    raw[-1] ^= 0xFF
    attr.s = ort_ops.base64.b64encode(bytes(raw))
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    x = torch.rand(2, *model.input_shape).numpy()
    with torch.no_grad():
        ref = folded(torch.from_numpy(x)).numpy()
    try:
        got = run_onnx(path, x, kernel=True)
    except Exception as e:  # onnxruntime may refuse the NaN column's shape: an ordinary error
        assert "onnxruntime cannot run" in str(e)
    else:
        assert not compare(got, ref, 1e-5, 1e-4)["ok"]
    # the standard-op body does not read the payload: it still equals torch
    assert compare(run_onnx(path, x), ref, 1e-5, 1e-4)["ok"]


def test_a_region_with_two_inputs_keeps_its_standard_ops():
    """A layer whose exported nodes read more than one activation is left alone (and said so)."""
    model = _compressed("tt")
    folded = folded_copy(model).eval()
    proto = to_onnx(folded, torch.rand(3, *model.input_shape), 18, strip=False)
    name = next(n for n, m in folded.named_modules() if n and ort_ops.pack_layer(m) is not None)
    # a node inside the layer's scope that also reads a value made outside it
    proto.graph.node.insert(0, onnx.helper.make_node("Identity", ["x"], ["x_copy"]))
    inside = next(m for m in proto.graph.node if name in ort_ops._scopes(m))
    extra = onnx.helper.make_node("Shape", ["x_copy"], ["x_shape"])
    extra.metadata_props.extend(inside.metadata_props)
    proto.graph.node.insert(list(proto.graph.node).index(inside), extra)
    rows = ort_ops.add_sparse_path(proto, folded, layers=[name])
    assert rows[0]["ok"] is False and "2 activation inputs" in rows[0]["why"]
    assert not any(n.op_type == ort_ops.OP_TYPE for n in proto.graph.node)


def test_export_onnx_fast_validates_both_ways_and_records_its_choices(tmp_path):
    from .test_export import _pruned

    art = _pruned("lenet300", "tt", sparsity=0.99)
    rep = export(art, tmp_path / "e", ExportOptions(formats=["onnx", "onnx-fast"]), MNIST)
    for label in ("onnx-fast", "onnx-fast+kernel"):
        assert all(c["ok"] for c in rep["validation"][label].values()), rep["validation"][label]
    layers = rep["fast"]["layers"]
    assert {r["layer"] for r in layers} == {"fc1", "fc2", "fc3"}
    assert all(r["ok"] and r["body"] in ("chain", "dense", *ort_ops.BODIES) for r in layers)
    timed = [r for r in layers if "us" in r]  # those with an alternative body (dense trace, nonzero block)
    assert timed
    bodies = {"chain", "dense", *ort_ops.BODIES}
    assert all("chain" in r["us"] and len(r["us"]) >= 2 and set(r["us"]) <= bodies
               and set(r["us"]["chain"]) == {1, 32} for r in timed)
    assert all(r["body"] == "chain" and "no dense body" in r["note"] for r in layers if "us" not in r)
    assert all("cores" in r["us"] for r in timed)  # every TT Linear also tried its transpose-free cores
    fast = rep["fast"]
    assert fast["choice"] in fast["model_us"] and "chain" in fast["model_us"]  # the plain graph competed
    m = onnx.load(str(tmp_path / "e" / "model.fast.onnx"))
    assert [n.op_type for n in m.graph.node].count(ort_ops.OP_TYPE) == 3
    assert sorted(f.overload for f in m.functions) == ["fc1", "fc2", "fc3"]
    assert not any(n.metadata_props for n in m.graph.node)  # no stack traces or local paths
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value
    saved = json.loads((tmp_path / "e" / "export.json").read_text())
    assert saved["fast"]["kernel"]["available"] is True


def test_a_layer_without_an_alternative_body_says_why_in_export_json(tmp_path, monkeypatch):
    from tedepr_cli.artifact import Artifact

    monkeypatch.setattr(ort_ops, "_same_signature", lambda *a: False)  # no dense body
    monkeypatch.setattr(ort_ops, "BODIES", {})  # no nonzero-block or cores body
    art = Artifact(model=_compressed("tt"), arch=None, meta={})
    export(art, tmp_path / "e", ExportOptions(formats=["onnx-fast"]))
    rows = json.loads((tmp_path / "e" / "export.json").read_text())["fast"]["layers"]
    assert rows and all(r["ok"] and r["body"] == "chain" and "us" not in r for r in rows), rows
    assert all("no dense body: the dense export's region takes or gives other shapes" in r["note"]
               and "no support body" in r["note"] and "no cores body" in r["note"] for r in rows), rows
    monkeypatch.undo()
    monkeypatch.setattr(ort_ops, "_same_signature", lambda *a: False)  # other bodies, but no dense one
    export(art, tmp_path / "f", ExportOptions(formats=["onnx-fast"]))
    rows = json.loads((tmp_path / "f" / "export.json").read_text())["fast"]["layers"]
    assert rows and all("cores" in r["us"] and "dense" not in r["us"] for r in rows), rows
    assert all(r["note"].startswith("no dense body: the dense export's region") for r in rows), rows


def test_without_onnxruntime_extensions_the_file_is_still_made_and_said_so(tmp_path, monkeypatch):
    from tedepr_cli.artifact import Artifact
    from tedepr_cli.errors import EngineUnavailable

    def missing() -> str:
        raise EngineUnavailable("the sparse ONNX path needs onnxruntime-extensions: No module named x")

    monkeypatch.setattr(ort_ops, "extensions_library", missing)
    art = Artifact(model=_compressed("tt"), arch=None, meta={})
    rep = export(art, tmp_path / "e", ExportOptions(formats=["onnx-fast"]))
    assert rep["fast"]["kernel"]["available"] is False
    assert "onnxruntime-extensions" in rep["fast"]["kernel"]["why"]
    assert "onnx-fast+kernel" not in rep["validation"]
    assert all(c["ok"] for c in rep["validation"]["onnx-fast"].values())
    with pytest.raises(EngineUnavailable):
        ort_ops.session(tmp_path / "e" / "model.fast.onnx", sparse=True)


def test_region_fits_only_the_layers_own_shapes():
    fits = ort_ops.region_fits
    assert fits("linear", ("batch", 64), ("batch", 36), (2, 64), (2, 36))
    # the caller's flatten folded into the layer: (B, 1, 8, 8) in, still (B, 36) out
    assert fits("linear", ("batch", 1, 8, 8), ("batch", 36), (2, 64), (2, 36))
    # ViT's qkv: the caller's reshape of the output folded in -> the kernel's output would be wrong
    assert not fits("linear", ("batch", 5, 32), ("batch", 5, 3, 4, 8), (2, 5, 32), (2, 5, 96))
    assert not fits("linear", ("batch", 7, 7), ("batch", 36), (2, 64), (2, 36))  # 49 != 64
    assert not fits("conv", ("batch", 8, 10, 10), ("batch", 12, 4, 4), (2, 8, 10, 10), (2, 12, 5, 5))
    assert not fits("linear", None, ("batch", 36), (2, 64), (2, 36))  # unknown: never guessed


def test_a_flatten_folded_into_the_layer_runs_on_the_kernel(tmp_path):
    """conv -> flatten -> TT Linear: the exporter folds the flatten into the layer's first
    reshape, so its node gets the 4-d activation; the op flattens it by the recorded rank."""
    from tedepr_cli.artifact import Artifact

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 20))
    model = tedepr.tensorize(net, rank=4, init="random", example_input=torch.rand(1, 1, 8, 8),
                             include=["3"])
    tedepr.prune(model, sparsity=0.6, criterion="magnitude")
    ort_ops._cache.clear()
    rep = export(Artifact(model=model.eval(), arch=None, meta={}), tmp_path / "e",
                 ExportOptions(formats=["onnx-fast"]))
    (row,) = rep["fast"]["layers"]
    assert row["layer"] == "3" and row["ok"], row
    assert all(c["ok"] for c in rep["validation"]["onnx-fast+kernel"].values())
    m = onnx.load(str(tmp_path / "e" / "model.fast.onnx"))
    (node,) = [n for n in m.graph.node if n.op_type == ort_ops.OP_TYPE]
    header, _ = ort_ops._decode(next(a.s.decode() for a in node.attribute if a.name == "chain"))
    assert header["in_rank"] == 2
    assert next(a.s.decode() for a in node.attribute if a.name == "key") in ort_ops._cache


@pytest.mark.parametrize("variant", ["gather", "place", "reshape"])
def test_support_body_is_the_layer_on_its_nonzero_block(variant):
    """The `support` body of a linear layer (the nonzero block of its dense weight: kept
    input features gathered, one MatMul, or a MatMul then a 0/1 placement when few output
    features are nonzero) computes the layer; a weight that is mostly nonzero gets none."""
    from onnx import helper

    torch.manual_seed(0)
    lin = nn.Linear(48, 40)
    with torch.no_grad():
        keep = torch.zeros(40, 48, dtype=torch.bool)
        if variant == "place":  # few output rows: the block (cols x rows) then the placement
            keep[[3, 17, 29]] = True
            keep[:, 24:] = False
        else:  # every row, few columns: gather then one MatMul
            keep[:, [1, 5, 9, 30]] = True
        lin.weight.mul_(keep)
    x_rank = 4 if variant == "reshape" else 3
    fn = ort_ops.support_function(lin, "fc", x_rank, 3, 18)
    assert fn is not None and fn.overload == "fc"
    ops = [n.op_type for n in fn.node]
    assert ops.count("Gather") == 1 and ops.count("MatMul") == (2 if variant == "place" else 1)
    assert ("Reshape" in ops) == (variant == "reshape")
    block = next(n for n in fn.node if n.output[0] == "fc/support/block")
    assert onnx.numpy_helper.to_array(block.attribute[0].t).size == (3 * 24 if variant == "place" else 4 * 40)
    shape = (5, 7, 6, 8) if variant == "reshape" else (5, 7, 48)
    node = helper.make_node(ort_ops.OP_TYPE, ["x"], ["y"], domain=ort_ops.DOMAIN, key="k", kind="linear",
                            chain="")
    node.overload = "fc"
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(ort_ops.DOMAIN, 1)]
    m = helper.make_model(g, opset_imports=opsets, functions=[fn])
    m.ir_version = 10
    x = torch.rand(shape)
    y = ort_ops.session(m.SerializeToString(), sparse=False).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = lin(x.reshape(5, 7, 48)).numpy()
    assert y.shape == ref.shape and _scaled_error(y, ref) <= 1e-6
    dense = nn.Linear(48, 40)
    assert ort_ops.support_function(dense, "fc", 3, 3, 18) is None  # nothing to skip
    assert ort_ops.support_function(nn.Conv2d(3, 4, 3), "c", 4, 4, 18) is None


def _one_node_model(fn, shape: tuple[int, ...]) -> bytes:
    """A model running one ``TedeprChain`` node whose function is ``fn`` on an input of ``shape``."""
    from onnx import helper

    node = helper.make_node(ort_ops.OP_TYPE, ["x"], ["y"], domain=ort_ops.DOMAIN, key="k", kind="linear",
                            chain="")
    node.overload = fn.overload
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(ort_ops.DOMAIN, 1)]
    m = helper.make_model(g, opset_imports=opsets, functions=[fn])
    m.ir_version = 10
    return m.SerializeToString()


@pytest.mark.parametrize("variant", ["2 cores", "3 cores", "no bias", "reshape"])
def test_cores_body_is_the_tt_layer_without_transposes(variant):
    """The `cores` body of a TT Linear (d MatMuls, the first from the right, the others from
    the left, Reshapes that move no data) computes the layer, for any number of cores,
    leading axes, with or without bias, and from a region whose input still has the
    caller's trailing axes (the exporter folded a flatten into the layer)."""
    from tedepr_cli.tensorized.tt import TTLinear

    three = variant != "2 cores"
    spec = {"in_modes": [4, 3, 4] if three else [6, 8], "out_modes": [2, 5, 3] if three else [5, 6],
            "ranks": [1, 3, 4, 1] if three else [1, 4, 1], "bias": variant != "no bias"}
    torch.manual_seed(1)
    layer = TTLinear(spec).eval()
    with torch.no_grad():
        for c in layer.cores:
            c.normal_().mul_(torch.rand_like(c) > 0.4)  # pruned entries: exact zeros
        if layer.bias is not None:
            layer.bias.normal_()
    x_rank = 4 if variant == "reshape" else 3
    fn = ort_ops.cores_function(layer, "fc", x_rank, 3, 18)
    assert fn is not None and fn.overload == "fc"
    ops = [n.op_type for n in fn.node if n.op_type != "Constant"]
    d = len(spec["in_modes"])
    assert "Transpose" not in ops and ops.count("MatMul") == d and ops.count("Reshape") == d + 1
    assert ops.count("Add") == (variant != "no bias")
    n = layer.in_features
    shape = (5, 7, 6, n // 6) if variant == "reshape" else (5, 7, n)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(2))
    y = ort_ops.session(_one_node_model(fn, shape), sparse=False).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = copy.deepcopy(layer).double()(x.reshape(5, 7, n).double()).numpy()
    assert ref.std() > 1e-3 * np.abs(ref).max()
    assert y.shape == ref.shape and _scaled_error(y, ref) <= 1e-5


def test_cores_body_is_only_for_linear_tt_chains():
    from tedepr_cli.tensorized.tr import TRLinear
    from tedepr_cli.tensorized.tt import TTLinear

    spec = {"in_modes": [6, 8], "out_modes": [5, 6], "ranks": [1, 4, 1]}
    assert ort_ops.cores_function(TTLinear(spec), "fc", 2, 2, 18) is not None
    assert ort_ops.cores_function(TTLinear({**spec, "chain": "nonlinear"}), "fc", 2, 2, 18) is None
    assert ort_ops.cores_function(TRLinear({**spec, "ranks": [2, 3, 3, 3, 2]}), "fc", 2, 2, 18) is None
    assert ort_ops.cores_function(nn.Linear(48, 30), "fc", 2, 2, 18) is None
    assert ort_ops.cores_function(TTLinear(spec), "fc", 1, 2, 18) is None  # fewer axes than the layer


def test_a_cores_body_in_the_model_runs_without_the_library():
    """`add_sparse_path` with the `cores` body: the file runs on stock onnxruntime (the
    function inlined) and equals the torch model at batches other than the traced one."""
    model = _compressed("tt")
    folded = folded_copy(model).eval()
    proto = to_onnx(folded, torch.rand(3, *model.input_shape), 18, strip=False)
    names = [n for n, m in folded.named_modules() if n and ort_ops.cores_function(m, n, 2, 2, 18)]
    assert names
    rows = ort_ops.add_sparse_path(proto, folded, choice={n: "cores" for n in names})
    assert all(r["ok"] for r in rows) and {r["layer"] for r in rows if r["body"] == "cores"} == set(names)
    onnx.checker.check_model(proto, full_check=True)
    bodies = {f.overload: [n.op_type for n in f.node] for f in proto.functions}
    assert all("Transpose" not in bodies[n] for n in names)
    sess = ort_ops.session(proto.SerializeToString(), sparse=False)
    for b in (1, 32):
        x = torch.rand(b, *model.input_shape, generator=torch.Generator().manual_seed(b))
        with torch.no_grad():
            ref = copy.deepcopy(folded).double()(x.double()).numpy()
        assert _scaled_error(sess.run(None, {"x": x.numpy()})[0], ref) <= 1e-4
