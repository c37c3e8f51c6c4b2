"""The Triton sparse-chain kernel and the bench's ``triton`` engine against the torch
reference (max relative error <= 1e-4), on the GPU when there is one, else in Triton's CPU
interpreter.

Triton picks its interpreter when it is first imported, so on a machine without CUDA the
tests below run in a fresh ``TRITON_INTERPRET=1`` pytest process started by
:func:`test_the_suite_under_the_interpreter`; in this process they skip. On a GPU machine
(``benchmarks/gpu_check.sh``) they run directly on ``cuda``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tedepr_cli.artifact import save_artifact
from tedepr_cli.bench.core import max_rel_error

from .conftest import LENET300, ROOT, run_cli
from .test_kernels import linear

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if CUDA else "cpu"
RTOL = 1e-4  # the bar: max |triton - reference| / max |reference|
here = pytest.mark.skipif(not (CUDA or INTERPRETED), reason="no CUDA: runs in a TRITON_INTERPRET=1 "
                          "process started by test_the_suite_under_the_interpreter")


def test_the_suite_under_the_interpreter(tmp_path):
    """Without a GPU: run this module in a fresh process with Triton's interpreter on."""
    if CUDA or INTERPRETED:
        pytest.skip("the tests run directly here")
    env = {**os.environ, "TRITON_INTERPRET": "1", "TEDEPR_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                        "tests/test_triton.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    tail = r.stdout.strip().splitlines()[-1]
    assert "failed" not in tail and "skipped" in tail and " 1 skipped" in tail, tail  # only this driver


class Launches:
    """Wraps the jitted kernel: records each launch's grid (and proves Triton ran)."""

    def __init__(self, monkeypatch):
        from tedepr_cli.kernels import triton as kt

        self.real = kt._csr_step_kernel()
        self.grids = []
        monkeypatch.setattr(kt, "_kernel", self)

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.real[grid]


def no_torch_path(monkeypatch):
    """Make the torch fallback fail: a test that passes then ran the Triton kernel."""
    from tedepr_cli.kernels.torch_path import TorchChain

    def refuse(self, xt):
        raise AssertionError("the torch path ran instead of Triton")

    monkeypatch.setattr(TorchChain, "feature_major", refuse)


def kernels():
    from tedepr_cli.kernels.cpu import SparseChainKernel

    torch.manual_seed(0)
    w = torch.randn(20, 30) * (torch.rand(20, 30) < 0.2)
    w[:4] = 0  # empty rows
    return {"sparse": SparseChainKernel.from_dense(w, torch.randn(20)),
            "tt": SparseChainKernel.from_layer(linear("tt", [2, 3, 5], [7, 1, 2], 4, 0.4)),
            "tr": SparseChainKernel.from_layer(linear("tr", [2, 3, 5], [7, 1, 2], 4, 0.4)),
            "tt-deep": SparseChainKernel.from_layer(linear("tt", [2, 2, 2, 3], [3, 2, 2, 2], 5, 0.5))}


@here
@pytest.mark.parametrize("name", ["sparse", "tt", "tr", "tt-deep"])
def test_kernel_matches_the_float64_torch_reference(name, monkeypatch):
    """Batch 1 to 300: every block size (32..256 lanes) and partial blocks."""
    from tedepr_cli.kernels.triton import TritonChainKernel

    kern = kernels()[name]
    tri = TritonChainKernel(kern.layout, DEVICE)
    xs = [torch.randn(b, kern.n_in) for b in (1, 7, 33, 300)]
    refs = [kern.torch_path(x.double()) for x in xs]
    launches = Launches(monkeypatch)
    no_torch_path(monkeypatch)
    for x, ref in zip(xs, refs, strict=True):
        y = tri(x.to(DEVICE))
        assert y.shape == ref.shape and y.device.type == DEVICE and y.dtype == torch.float32
        assert max_rel_error(y, ref) <= RTOL
    assert {g[1] for g in launches.grids} >= {1}
    assert len(launches.grids) == 4 * len(kern.layout.steps)


@here
@pytest.mark.parametrize("dead", [[0, 1, 2, 9, 10], [3, 4], list(range(11))])
def test_dead_groups_are_not_launched_and_change_nothing(dead, monkeypatch):
    """Like the C kernel, a step computes only its live free groups (outputs a later step
    reads): the launch grid covers the live range only, the result is the reference's."""
    from tedepr_cli.kernels.cpu import SparseChainKernel
    from tedepr_cli.kernels.triton import TritonChainKernel, block_for

    layer = linear("tt", [5, 11], [6, 3], 4, 0.6, seed=len(dead))
    with torch.no_grad():
        layer.cores[1][:, dead] = 0
    kern = SparseChainKernel.from_layer(layer)
    s0 = kern.layout.steps[0]
    assert s0.live_groups == (0 if len(dead) == 11 else max(v for v in range(11) if v not in dead)
                              - min(v for v in range(11) if v not in dead) + 1)
    tri = TritonChainKernel(kern.layout, DEVICE)
    launches = Launches(monkeypatch)
    b = 9
    x = torch.randn(b, 55)
    y = tri(x.to(DEVICE))
    assert max_rel_error(y, kern.torch_path(x.double())) <= RTOL
    live_cols = s0.live_groups * b
    first = launches.grids[0] if s0.live_groups else None
    if s0.live_groups:
        assert first == (s0.n_rows, math.ceil(live_cols / block_for(live_cols)))
    else:
        assert len(launches.grids) == len(kern.layout.steps) - 1  # the dead step is not launched


@here
def test_feature_major_blocks_match_one_call_per_block():
    """``(nb, N, B) -> (nb, M, B)``: the conv layout, pixels as lanes, one block per image."""
    from tedepr_cli.kernels.triton import TritonChainKernel

    kern = kernels()["tr"]
    tri = TritonChainKernel(kern.layout, DEVICE)
    xt = torch.randn(3, kern.n_in, 17)
    y = tri.feature_major(xt.to(DEVICE))
    ref = torch.stack([kern.torch_path.feature_major(t.double()) for t in xt])
    assert y.shape == (3, kern.n_out, 17) and max_rel_error(y, ref) <= RTOL
    with pytest.raises(ValueError):
        tri.feature_major(torch.randn(2, kern.n_in + 1, 3).to(DEVICE))


def _artifacts(tmp):
    """Pruned LeNet-300-100 (TT cores), a small pruned ResNet-20 (TT conv chains) and a
    dense-pruned LeNet-300-100 (plain pruned nn.Linear)."""
    from tedepr_cli.arch import build, parse_arch
    from tedepr_cli.loading import load_model
    from tedepr_cli.pruning.prune import PruneOptions, prune

    lenet = parse_arch("lenet300")
    spec = parse_arch("resnet20", json.dumps({"in_channels": 1, "input_size": 8, "width": 0.5}))
    torch.manual_seed(0)
    torch.save(build(spec).state_dict(), tmp / "resnet.pt")
    out = {}
    for name, path, arch, kw in [("lenet-tt", LENET300, lenet, {}),
                                 ("resnet-tt", tmp / "resnet.pt", spec, {}),
                                 ("lenet-dense", LENET300, lenet, {"decompose": False})]:
        art, _ = prune(load_model(path, arch), PruneOptions(sparsity=0.99, criterion="magnitude", **kw))
        out[name] = art
    return out


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    return _artifacts(tmp_path_factory.mktemp("tri"))


@here
@pytest.mark.parametrize("name", ["lenet-tt", "resnet-tt", "lenet-dense"])
def test_triton_model_runs_every_compressed_layer_and_matches(name, arts, monkeypatch):
    from tedepr_cli.execution import candidates
    from tedepr_cli.kernels.triton import TritonLayer, triton_model

    art = arts[name]
    model, on = triton_model(art.model, art.masks, DEVICE)
    assert on and set(on) == set(candidates(art.model, art.masks))
    assert all(isinstance(model.get_submodule(n), TritonLayer) for n in on)
    assert not model.training
    assert next(art.model.parameters()).device.type == "cpu"  # the artifact stays where it was
    x = torch.rand(3, *art.input_shape)
    with torch.no_grad():
        ref = copy.deepcopy(art.model).double()(x.double())
        launches = Launches(monkeypatch)
        no_torch_path(monkeypatch)
        y = model(x.to(DEVICE))
    assert launches.grids
    assert max_rel_error(y, ref) <= RTOL
    monkeypatch.undo()
    y_grad = model(x.to(DEVICE))  # autograd on: the wrapped layers' own forward
    assert y_grad.requires_grad and max_rel_error(y_grad, ref) <= RTOL


@here
def test_bench_times_the_triton_engine(arts, tmp_path):
    """The ``triton`` engine is timed beside the others, its error against the float64
    reference reported per batch (on the CPU with a warning that interpreted times are
    no GPU speed)."""
    target = save_artifact(arts["lenet-tt"], tmp_path / "l")
    r = run_cli("bench", target, "--device", DEVICE, "--engines", "dense-torch,chain-torch,triton", "--json",
                "--iters", "1", "--warmup", "0", "--batch", "1,3", "--no-memory")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    for b in ("1", "3"):
        assert set(d["results"][b]) == {"dense-torch", "chain-torch", "triton"}
        assert d["results"][b]["triton"]["n"] == 1 and d["results"][b]["triton"]["median_s"] > 0
        assert d["triton"]["max_rel_error"][b] <= RTOL
    from tedepr_cli.execution import candidates

    art = arts["lenet-tt"]
    assert set(d["triton"]["layers"]) == set(candidates(art.model, art.masks))
    assert "triton" not in d["skipped_engines"]
    assert ("interpreter" in r.stderr) == (DEVICE == "cpu")
    assert d["triton"]["interpreted"] == INTERPRETED
