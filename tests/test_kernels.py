"""Compiled sparse chain kernels (issue #7): the C kernel and the torch path agree with
float64 references over shapes, ranks, sparsities, batch sizes (the Triton kernel:
tests/test_triton.py); the build cache, a missing compiler and concurrent first builds
behave; ``tedepr kernels`` reports and checks."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch

from tedepr_cli.kernels import build
from tedepr_cli.kernels.cpu import ConvChainKernel, KernelLinear, SparseChainKernel, supports
from tedepr_cli.kernels.layout import sparse_matrix_layout
from tedepr_cli.kernels.torch_path import TorchChain
from tedepr_cli.tensorized.layers import build_layer
from tedepr_cli.tensorized.plan import chain_dims, ranks_for

from .conftest import ROOT, run_cli

TOL = 1e-5
BATCHES = (1, 7, 33, 128)


@pytest.fixture(scope="module", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Build into a private cache so the tests neither use nor leave a user's library."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEDEPR_CACHE_DIR", str(tmp_path_factory.mktemp("kcache")))
        for var in ("TEDEPR_CC", "TEDEPR_CFLAGS", "TEDEPR_KERNELS"):
            mp.delenv(var, raising=False)
        build.reset()
        yield
    build.reset()


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A build state that forgets the loaded library before and after the test."""
    monkeypatch.setenv("TEDEPR_CACHE_DIR", str(tmp_path / "cache"))
    build.reset()
    yield monkeypatch
    build.reset()


needs_cc = pytest.mark.skipif(build.find_compiler() is None, reason="no C compiler")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


def pruned_(cores, density: float, g: torch.Generator, empty_rows: bool = False) -> None:
    """Random values, a fraction ``density`` kept; optionally whole slices of zeros."""
    with torch.no_grad():
        for c in cores:
            c.copy_(torch.randn(c.shape, generator=g) * (torch.rand(c.shape, generator=g) < density))
            if empty_rows and c.shape[1] > 1:
                c[:, 0] = 0  # every entry of one mode value: rows of the step with nothing stored


def linear(fmt: str, ins, outs, r: int, density: float = 0.4, seed: int = 0, empty_rows=False):
    spec = {"type": "linear", "format": fmt, "in_modes": ins, "out_modes": outs, "bias": True,
            "chain": "linear"}
    spec["ranks"] = ranks_for(chain_dims(spec), r, ring=fmt == "tr")
    layer = build_layer(spec).eval()
    g = torch.Generator().manual_seed(seed)
    pruned_(layer.cores, density, g, empty_rows)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
    return layer


def ref64(module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(module).double()(x.double())


def check(kern: SparseChainKernel, x: torch.Tensor, ref: torch.Tensor) -> None:
    """Compiled (if built), torch path and feature-major entry all match ``ref``."""
    y = kern(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert rel(y, ref) <= TOL
    assert rel(kern.torch_path(x), ref) <= TOL
    assert rel(kern.feature_major(x.reshape(-1, kern.n_in).t().contiguous()).t(),
               ref.reshape(-1, kern.n_out)) <= TOL


LINEAR = [([4, 7], [3, 5], 3), ([2, 3, 5], [7, 1, 2], 4), ([5], [6], 3), ([1, 11], [13, 1], 2),
          ([2, 2, 2, 3], [3, 2, 2, 2], 5), ([32, 32], [32, 32], 8)]


@pytest.mark.parametrize("fmt", ["tt", "tr"])
@pytest.mark.parametrize("ins,outs,r", LINEAR)
@pytest.mark.parametrize("density", [1.0, 0.3, 0.05])
def test_linear_chain_matches_float64(fmt, ins, outs, r, density):
    layer = linear(fmt, ins, outs, r, density, seed=len(ins) + r)
    kern = SparseChainKernel.from_layer(layer)
    assert kern.compiled == build.available()
    assert kern.layout.nnz == sum(int((c != 0).sum()) for c in layer.cores)
    g = torch.Generator().manual_seed(1)
    for b in BATCHES:
        x = torch.randn(b, math.prod(ins), generator=g)
        check(kern, x, ref64(layer, x))


@pytest.mark.parametrize("fmt", ["tt", "tr"])
def test_empty_rows_and_fully_pruned_core(fmt):
    layer = linear(fmt, [4, 6], [5, 3], 4, 0.5, empty_rows=True)
    x = torch.randn(9, 24)
    check(SparseChainKernel.from_layer(layer), x, ref64(layer, x))
    with torch.no_grad():
        layer.cores[1].zero_()  # nothing stored at all: the output is the bias
    kern = SparseChainKernel.from_layer(layer)
    assert kern.layout.steps[1].nnz == 0
    assert torch.equal(kern(x), layer.bias.detach().expand(9, -1))


def test_masks_decide_what_is_stored():
    layer = linear("tt", [4, 7], [3, 5], 3, 1.0)
    masks = [torch.rand(c.shape, generator=torch.Generator().manual_seed(i)) < 0.3
             for i, c in enumerate(layer.cores)]
    with torch.no_grad():
        layer.cores[0][masks[0]] = 0.0  # a kept entry may be an exact zero
    kern = SparseChainKernel.from_layer(layer, masks)
    assert kern.layout.nnz == sum(int(m.sum()) for m in masks)
    masked = copy.deepcopy(layer)
    with torch.no_grad():
        for c, m in zip(masked.cores, masks, strict=True):
            c.mul_(m)
    x = torch.randn(5, 28)
    check(kern, x, ref64(masked, x))
    # an artifact-style mask dict (parameter names) works too
    named = {f"fc1.cores.{i}": m for i, m in enumerate(masks)}
    assert torch.equal(SparseChainKernel.from_layer(layer, named)(x), kern(x))


@pytest.mark.parametrize("m,n,density", [(1024, 1024, 0.005), (40, 70, 0.05), (33, 17, 1.0),
                                         (8, 9, 0.0)])
def test_sparse_matrix_one_core_chain(m, n, density):
    g = torch.Generator().manual_seed(m)
    w = torch.randn(m, n, generator=g) * (torch.rand(m, n, generator=g) < density)
    w[: m // 3] = 0  # fully empty rows
    bias = torch.randn(m, generator=g)
    kern = SparseChainKernel.from_dense(w, bias)
    assert kern.layout.nnz == int((w != 0).sum())
    for b in BATCHES:
        x = torch.randn(b, n, generator=g)
        ref = x.double() @ w.double().t() + bias.double()
        check(kern, x, ref)
    lin = torch.nn.Linear(n, m)
    with torch.no_grad():
        lin.weight.copy_(w)
    x = torch.randn(3, n, generator=g)
    assert rel(SparseChainKernel.from_linear(lin)(x), ref64(lin, x)) <= TOL


def conv(fmt, ins, outs, r, k, stride, pad, dil, density=0.5):
    spec = {"type": "conv2d", "format": fmt, "in_modes": ins, "out_modes": outs, "bias": True,
            "chain": "linear", "kernel_size": list(k), "stride": list(stride), "padding": list(pad),
            "dilation": list(dil), "input_hw": [9, 7]}
    spec["ranks"] = ranks_for(chain_dims(spec), r, ring=fmt == "tr")
    layer = build_layer(spec).eval()
    g = torch.Generator().manual_seed(r)
    pruned_(layer.cores, density, g)
    with torch.no_grad():
        layer.bias.normal_(generator=g)
    return layer


@pytest.mark.parametrize("fmt", ["tt", "tr"])
@pytest.mark.parametrize("ins,outs,r,k,stride,pad,dil", [
    ([4, 2], [3, 5], 3, (3, 3), (1, 1), (1, 1), (1, 1)),
    ([2, 3, 2], [2, 2, 2], 4, (3, 1), (2, 1), (0, 1), (1, 1)),
    ([6], [10], 5, (5, 5), (2, 2), (2, 2), (2, 1)),
])
def test_conv_chain_matches_float64(fmt, ins, outs, r, k, stride, pad, dil):
    layer = conv(fmt, ins, outs, r, k, stride, pad, dil)
    kern = ConvChainKernel(layer)
    for b in (1, 3):
        x = torch.randn(b, math.prod(ins), 9, 7)
        ref = ref64(layer, x)
        assert rel(kern(x), ref) <= TOL
        assert kern(x).shape == ref.shape
    assert kern.flops(2, (9, 7)) > 0


def test_lstm_input_projection():
    from tedepr_cli.tensorized.wrappers import TensorizedLSTM

    ih = {"type": "linear", "format": "tt", "in_modes": [4, 5], "out_modes": [8, 4], "bias": True,
          "chain": "linear", "ranks": [1, 4, 1]}
    lstm = TensorizedLSTM({"type": "lstm", "input_size": 20, "hidden_size": 8, "num_layers": 1,
                           "bidirectional": False, "batch_first": True, "bias": True, "ih": [ih]}).eval()
    g = torch.Generator().manual_seed(0)
    pruned_(lstm.ih[0].cores, 0.4, g)
    with torch.no_grad():
        lstm.weight_hh_l0.normal_(generator=g)
        lstm.ih[0].bias.normal_(generator=g)
    x = torch.randn(3, 6, 20, generator=g)
    ref, _ = copy.deepcopy(lstm).double()(x.double())
    lstm.ih[0] = KernelLinear(lstm.ih[0])  # a drop-in module: (B, T, D) leading dims kept
    with torch.no_grad():
        out, _ = lstm(x)
    assert rel(out, ref) <= TOL


@pytest.mark.parametrize("fmt", ["tt", "tr"])
@pytest.mark.parametrize("dead", [[0, 1, 2, 9, 10], [3, 4], [0, 10], list(range(11))])
def test_dead_input_modes_are_skipped(fmt, dead):
    """Pruning that empties whole input-mode values of a later core (MNIST's border pixels)
    makes the earlier step's outputs for them dead: the compiled kernel computes only the
    live range of groups, with the same result (odd widths: partial tiles, over-reads)."""
    layer = linear(fmt, [5, 11], [6, 3], 4, 0.6, seed=len(dead))
    with torch.no_grad():
        layer.cores[1][:, dead] = 0  # core 1's input mode values `dead` are never used
    kern = SparseChainKernel.from_layer(layer)
    s0 = kern.layout.steps[0]
    live = [v for v in range(11) if v not in dead]
    if fmt == "tt":  # TT step 0's free groups are exactly core 1's input mode values
        assert (s0.g_lo, s0.g_lo + s0.live_groups) == ((live[0], live[-1] + 1) if live else (0, 0))
    assert kern.flops(1) <= 2 * sum(s.nnz * s.g_in for s in kern.layout.steps)
    for b in (1, 2, 7, 16, 33):
        x = torch.randn(b, 55)
        check(kern, x, ref64(layer, x))


def test_deterministic_and_thread_count_independent():
    layer = linear("tr", [8, 8], [4, 16], 6, 0.3)
    kern = SparseChainKernel.from_layer(layer)
    x = torch.randn(33, 64)
    y = kern(x)
    assert torch.equal(kern(x), y)
    kern.threads = 2
    assert torch.equal(kern(x), y)  # each output element is one fixed-order sum
    kern.threads, kern.chunk = 1, 8
    assert rel(kern(x), y) <= TOL


def test_shapes_dtypes_and_fallbacks():
    layer = linear("tt", [4, 7], [3, 5], 3)
    kern = SparseChainKernel.from_layer(layer)
    x = torch.randn(2, 3, 28)
    assert kern(x).shape == (2, 3, 15) and rel(kern(x), ref64(layer, x)) <= TOL
    xt = torch.randn(28, 6).t()  # non-contiguous
    assert rel(kern(xt), ref64(layer, xt)) <= TOL
    assert kern(torch.randn(0, 28)).shape == (0, 15)
    x64 = torch.randn(4, 28, dtype=torch.float64)  # other dtypes take the torch path
    assert kern(x64).dtype == torch.float64 and rel(kern(x64), ref64(layer, x64)) <= TOL
    xg = torch.randn(4, 28, requires_grad=True)  # autograd too
    kern(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        kern(torch.randn(4, 27))
    nonlinear = build_layer({**layer.spec(), "chain": "nonlinear"})
    assert not supports(nonlinear) and supports(layer)
    with pytest.raises(ValueError, match="torch forward"):
        SparseChainKernel.from_layer(nonlinear)


def test_torch_path_alone_matches():
    layer = linear("tr", [3, 4], [2, 6], 3, 0.5)
    path = TorchChain(SparseChainKernel.from_layer(layer).layout)
    x = torch.randn(5, 12)
    assert rel(path(x), ref64(layer, x)) <= TOL
    w = torch.zeros(4, 5)
    assert torch.equal(TorchChain(sparse_matrix_layout(w))(torch.randn(2, 5)), torch.zeros(2, 4))


def test_triton_reports_cleanly_when_missing(monkeypatch):
    from tedepr_cli.kernels import triton as tk

    monkeypatch.setitem(sys.modules, "triton", None)  # import fails
    st = tk.status()
    assert st["available"] is False and "triton" in st["reason"]
    tri = tk.TritonChainKernel(SparseChainKernel.from_dense(torch.eye(3)).layout, "cpu")
    assert torch.equal(tri(torch.ones(2, 3)), torch.ones(2, 3))  # the torch path serves


@needs_cc
def test_build_cache_reuses_and_rebuilds_on_flag_change(fresh_build):
    first = build.status()
    assert first["available"] and first["compiled"], first["reason"]
    build.reset()
    again = build.status()
    assert again["available"] and not again["compiled"] and again["library"] == first["library"]
    fresh_build.setenv("TEDEPR_CFLAGS", "-O2 -march=native")
    build.reset()
    other = build.status()
    assert other["available"] and other["compiled"] and other["library"] != first["library"]
    assert "-O2" in other["flags"] and "-shared" in other["flags"]


def test_missing_compiler_is_a_notice_not_an_error(fresh_build):
    fresh_build.setenv("TEDEPR_CC", "/nonexistent/cc")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("tedepr")
    logger.addHandler(handler)
    try:
        assert build.available() is False
        assert build.available() is False  # the notice is given once
        st = build.status()
        assert "nonexistent" in st["reason"] and st["library"] is None
        kern = SparseChainKernel.from_dense(torch.eye(4) * 2)
        assert not kern.compiled
        assert torch.equal(kern(torch.ones(3, 4)), torch.full((3, 4), 2.0))
    finally:
        logger.removeHandler(handler)
    notices = [r for r in records if "unavailable" in r.getMessage()]
    assert len(notices) == 1 and notices[0].levelno == logging.WARNING


def test_failed_build_is_a_notice(fresh_build):
    fresh_build.setenv("TEDEPR_CFLAGS", "-fno-such-option-tedepr")
    if build.find_compiler() is None:
        pytest.skip("no C compiler")
    assert build.available() is False
    assert "build failed" in build.status()["reason"]
    assert not [p for p in os.listdir(build.cache_dir()) if p.endswith(".tmp")]


@needs_cc
def test_concurrent_first_build(tmp_path):
    code = ("import sys; from tedepr_cli.kernels import build; "
            "s = build.status(); sys.exit(0 if s['available'] else 1)")
    env = {**os.environ, "TEDEPR_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    libs = [p for p in os.listdir(tmp_path / "kernels") if p.endswith(".so")]
    assert len(libs) == 1
    assert not [p for p in os.listdir(tmp_path / "kernels") if p.endswith(".tmp")]


def test_cli_kernels_reports_and_checks(fresh_build):
    r = run_cli("kernels", "--json")
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)
    assert set(rep) >= {"cpu", "triton", "cuda"} and "cache_dir" in rep["cpu"]
    if rep["cpu"]["available"]:
        r = run_cli("kernels", "--check", "--json")
        assert r.exit_code == 0, r.stderr
        assert json.loads(r.stdout)["check"]["ok"]
    build.reset()
    fresh_build.setenv("TEDEPR_CC", "/nonexistent/cc")
    r = run_cli("kernels", "--check")
    assert r.exit_code == 10 and "cannot be built" in r.stderr
