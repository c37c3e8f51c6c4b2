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
from tedepr_cli.masks import plain_named_parameters
from tedepr_cli.pruning.prune import PruneOptions, prune

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

    monkeypatch.setattr(E, "run_onnx",
                        lambda path, x, device="cpu", kernel=False: np.zeros((len(x), 10), np.float32))
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


# ---------------------------------------------------------------------------- tracing rule (issue 15.2)
@pytest.mark.parametrize("name", ["lstm", "vit_tiny", "resnet20"])
def test_batch_one_export_keeps_a_dynamic_batch_and_runs_at_an_untraced_batch(name, tmp_path):
    """`--batch-sizes 1` used to trace at batch 1: a fixed [1, ...] input (LSTM, ViT) or a
    failed export (ResNet-20). Traced at 2, the ONNX must run at batch 3 and match torch."""
    import onnxruntime as ort

    from tedepr_cli.export import compare

    art = _pruned(name, sparsity=0.9)
    rep = export(art, tmp_path / "e", ExportOptions(formats=["onnx"], batch_sizes=[1]))
    assert rep["traced_batch"] == 2 and list(rep["validation"]["onnx"]) == ["1"]
    sess = ort.InferenceSession(str(tmp_path / "e" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert isinstance(sess.get_inputs()[0].shape[0], str)  # symbolic batch axis
    x = torch.rand(3, *art.input_shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = art.model(x).numpy()
    assert np.ptp(ref, axis=0).max() > 0  # the outputs depend on the input: a real comparison
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert compare(got, ref, 1e-5, 1e-4)["ok"]


def test_trace_batch_is_never_one_nor_a_validated_batch():
    from tedepr_cli.export import trace_batch

    assert trace_batch([1]) == 2 and trace_batch([1, 7]) == 2
    assert trace_batch([2]) == 3 and trace_batch([1, 2, 3, 5]) == 4


def test_fixed_batch_axis_is_a_validation_failure(tmp_path, monkeypatch):
    """Traced at batch 1 (the old rule, forced here) the LSTM's ONNX keeps a fixed batch of 1
    that a batch-1 check alone would pass: the export must refuse it and write nothing."""
    import tedepr_cli.export as E

    monkeypatch.setattr(E, "trace_batch", lambda sizes: 1)
    with pytest.raises(ValidationError, match="fixed batch axis"):
        export(_pruned("lstm", sparsity=0.9), tmp_path / "e",
               ExportOptions(formats=["onnx"], batch_sizes=[1]))
    assert list(tmp_path.iterdir()) == []


def test_validate_refuses_an_onnx_whose_batch_axis_was_fixed(tmp_path):
    out = tmp_path / "e"
    export(_pruned("lenet300"), out, ExportOptions(formats=["onnx"]))
    n = len(np.load(out / "sample_inputs.npy"))
    m = onnx.load(str(out / "model.onnx"))
    for v in (m.graph.input[0], m.graph.output[0]):  # pin the batch at the saved sample count
        v.type.tensor_type.shape.dim[0].dim_value = n
    onnx.save(m, str(out / "model.onnx"))
    r = run_cli("validate", out)
    assert r.exit_code == 8 and "model.onnx" in r.stderr
    assert "fixed batch axis" in run_cli("validate", out, "--json").stdout


# ---------------------------------------------------------------------------- data (issue 15.7)
def test_export_reads_every_data_layout_like_eval(tmp_path):
    """`--data` went through the .npz reader alone: an MNIST IDX folder (prefixed or found
    by detection) must give the first test images, as `eval` reads them."""
    from tedepr_cli.artifact import save_artifact

    from .test_datasets import make_mnist_idx

    root = make_mnist_idx(tmp_path / "mnist")
    src = save_artifact(_pruned("lenet5"), tmp_path / "p")
    for i, spec in enumerate((f"mnist-idx:{root}", str(root))):
        r = run_cli("export", src, "--to", "safetensors", "--data", spec, "-o", tmp_path / f"e{i}")
        assert r.exit_code == 0, r.stderr
        x = np.load(tmp_path / f"e{i}" / "sample_inputs.npy")
        raw = np.frombuffer((root / "t10k-images-idx3-ubyte").read_bytes()[16:], np.uint8).reshape(-1, 28, 28)
        np.testing.assert_array_equal(x[:, 0], raw[: len(x)] / np.float32(255))
    assert run_cli("eval", src, "--data", f"mnist-idx:{root}").exit_code == 0


def test_export_inputs_follow_the_normalization_recorded_in_the_manifest(tmp_path):
    art = _pruned("lenet300")
    art.meta["data"] = {"preprocess": {"family": "npz", "normalize": "computed", "mean": [0.25],
                                       "std": [0.5]}}
    rep = export(art, tmp_path / "e", ExportOptions(formats=["onnx"]), MNIST)
    assert rep["inputs"]["normalize"] == "recorded"
    with np.load(MNIST) as f:
        raw = f["x"][f["split"] == 1][:7].reshape(7, -1) / np.float32(255)
    np.testing.assert_allclose(np.load(tmp_path / "e" / "sample_inputs.npy"), (raw - 0.25) / 0.5, atol=1e-6)


# ---------------------------------------------------------------------------- tolerance (issue 15.9)
def _tiny_outputs():
    """The sample-sized LeNet-300-100 with its last layer scaled so outputs are about 1e-6
    (what a VGG-11 with torchvision-style init gives at 99.5 %)."""
    art = _pruned("lenet300")
    x = torch.rand(7, *art.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        factor = 1e-6 / float(art.model(x).abs().max())
        # one core: the layer's weight is linear in it (the stored tensor: the core a forward
        # reads is computed from it and the mask riding on the module)
        plain_named_parameters(art.model)["fc3.cores.0"].mul_(factor)
        art.model.fc3.bias.mul_(factor)
        out = art.model(x)
    assert 1e-7 < out.abs().max() < 1e-5
    return art


def _corrupt_largest_initializer(proto):
    """Scale the largest initializer (a core of fc1) by 1.01: every output moves by about 1 %."""
    from onnx import numpy_helper

    init = max(proto.graph.initializer, key=lambda i: int(np.prod(i.dims)))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.01), init.name))


def test_tolerance_scales_with_small_outputs(tmp_path, monkeypatch):
    import tedepr_cli.export as E

    art = _tiny_outputs()
    rep = export(art, tmp_path / "ok", ExportOptions(formats=["onnx"]), MNIST)  # a faithful export passes
    assert all(c["ok"] and c["max_scaled"] < 1e-5 for c in rep["validation"]["onnx"].values())

    real = E.to_onnx

    def corrupted(*a, **kw):
        proto = real(*a, **kw)
        _corrupt_largest_initializer(proto)
        return proto

    monkeypatch.setattr(E, "to_onnx", corrupted)
    with pytest.raises(ValidationError, match="differs from PyTorch") as e:
        export(art, tmp_path / "bad", ExportOptions(formats=["onnx"]), MNIST)
    assert "scale" in str(e.value) and not (tmp_path / "bad").exists()
    # the same rule on re-validation: tamper with the good export's file
    m = onnx.load(str(tmp_path / "ok" / "model.onnx"))
    _corrupt_largest_initializer(m)
    onnx.save(m, str(tmp_path / "ok" / "model.onnx"))
    assert run_cli("validate", tmp_path / "ok").exit_code == 8


def test_compare_rule():
    from tedepr_cli.export import compare

    ref = np.array([[1e-6, -2e-6, 0.0]], np.float32)
    assert compare(ref * (1 + 1e-7), ref, 1e-5, 1e-4)["ok"]
    c = compare(ref * 1.01, ref, 1e-5, 1e-4)  # 1 % off: a fixed atol of 1e-5 passed this
    assert not c["ok"] and abs(c["max_scaled"] - 0.01) < 1e-4 and c["scale"] == pytest.approx(2e-6)
    assert compare(ref + 1e-9, ref, 1e-3, 0)["ok"] and not compare(ref + 1e-8, ref, 1e-3, 0)["ok"]
    assert not compare(np.full_like(ref, np.nan), ref, 1, 1)["ok"]
    z = np.zeros((2, 3), np.float32)
    assert compare(z, z, 1e-5, 1e-4)["ok"] and not compare(z + 1e-30, z, 1e-5, 1e-4)["ok"]
    assert not compare(z, ref, 1, 1)["ok"]  # shape mismatch


# ---------------------------------------------------------------------------- quiet export (15.10)
DATA_BRANCH = '''
import torch
from torch import nn


class DataBranch(nn.Module):
    """Control flow on a value: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)
        self.input_shape = (784,)

    def forward(self, x):
        y = self.fc(x)
        return y.relu() if y.sum() > 0 else -y
'''


def test_failing_export_writes_one_line_to_stderr(tmp_path):
    """A failed export used to put the exporter's guard logging (50-150 lines) on stderr."""
    import os
    import subprocess
    import sys

    from .conftest import ROOT

    (tmp_path / "tedepr_databranch.py").write_text(DATA_BRANCH)
    ck = tmp_path / "m.pt"
    torch.save({"fc.weight": torch.randn(10, 784), "fc.bias": torch.zeros(10)}, ck)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-m", "tedepr_cli", "export", str(ck), "--arch",
                        "tedepr_databranch:DataBranch", "--to", "onnx", "-o", str(tmp_path / "e")],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 8, r.stderr[-2000:]
    lines = r.stderr.splitlines()
    assert len(lines) == 1, lines[:5]
    assert lines[0].startswith("tedepr: validation failed: ONNX export failed: GuardOnDataDependent")
    assert "\x1b[" not in r.stderr and not (tmp_path / "e").exists()


def test_quiet_export_restores_every_logger_and_stream(tmp_path):
    import logging
    import sys
    import warnings

    from tedepr_cli.export import to_onnx

    ns: dict = {}
    exec(compile(DATA_BRANCH, "databranch", "exec"), ns)
    good, bad = _pruned("lenet300").model.eval(), ns["DataBranch"]().eval()

    def snapshot():
        return {n: lg.level for n, lg in logging.root.manager.loggerDict.items()
                if isinstance(lg, logging.Logger)}

    to_onnx(good, torch.rand(2, *good.input_shape), 18)  # the exporter's modules and loggers exist now
    before, streams, filters = snapshot(), (sys.stdout, sys.stderr), list(warnings.filters)
    with pytest.raises(ValidationError, match="ONNX export failed"):
        to_onnx(bad, torch.rand(2, 784), 18)
    to_onnx(good, torch.rand(2, *good.input_shape), 18)
    after = snapshot()
    assert {n: after[n] for n in before} == before
    assert (sys.stdout, sys.stderr) == streams and warnings.filters == filters


# ---------------------------------------------------------------------------- kept count, help (21.6)
def test_kept_count_is_the_prune_count_and_tolerances_have_help(tmp_path):
    from tedepr_cli.loading import load_model

    from .conftest import LENET300

    pruned, report = prune(load_model(LENET300, parse_arch("lenet300")),
                           PruneOptions(sparsity=0.995, criterion="snip"), MNIST)
    assert report["kept"] == 1331
    from tedepr_cli.artifact import save_artifact

    src = save_artifact(pruned, tmp_path / "p")
    r = run_cli("export", src, "--to", "safetensors,onnx", "-o", tmp_path / "e", "--json")
    d = json.loads(r.stdout)
    for f in ("safetensors", "onnx"):
        assert (d["formats"][f]["kept"], d["formats"][f]["other"]) == (1331, 410)
    assert (d["dense_original"]["kept"], d["dense_original"]["other"]) == (266200, 410)
    r = run_cli("export", src, "--to", "safetensors", "-o", tmp_path / "f")
    assert "1,331" in r.stdout and "1,741" not in r.stdout
    for cmd in ("export", "validate"):
        h = " ".join(run_cli(cmd, "--help").stdout.split())
        assert "fraction of the output's scale" in h and "relative tolerance per entry" in h
