"""What kernels this machine can run (``tedepr kernels``) and a quick correctness self-test.

The self-test packs small random pruned TT, TR and plain sparse layers, runs the compiled
kernel at a few batch sizes (1, an odd one, one past a tile) and compares with a float64
torch reference, and the compiled training chain's output and gradients (input, cores,
bias) with the float64 chain's: a user sees in a second whether the kernel built here
computes right.
"""

from __future__ import annotations

import math
from typing import Any

from . import build
from . import triton as triton_kernels

TOLERANCE = 1e-5


def _random_layer(fmt: str, ins: list[int], outs: list[int], rank: int, density: float, seed: int):
    import torch

    from ..tensorized.layers import build_layer
    from ..tensorized.plan import chain_dims, ranks_for

    spec = {"type": "linear", "format": fmt, "in_modes": ins, "out_modes": outs, "bias": True,
            "chain": "linear"}
    spec["ranks"] = ranks_for(chain_dims(spec), rank, ring=fmt == "tr")
    layer = build_layer(spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for c in layer.cores:
            c.copy_(torch.randn(c.shape, generator=g) * (torch.rand(c.shape, generator=g) < density))
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
    return layer.eval()


def self_test(seed: int = 0) -> dict[str, Any]:
    """Compiled kernel vs float64 torch on small pruned layers; ``ok`` if every relative
    error is within :data:`TOLERANCE`. Needs the library (see :func:`build.available`)."""
    import torch

    from .cpu import SparseChainKernel

    cases = []
    g = torch.Generator().manual_seed(seed)
    layers = {"tt 4x7->3x5 r3": _random_layer("tt", [4, 7], [3, 5], 3, 0.5, seed),
              "tr 2x3x5->7x1x2 r4": _random_layer("tr", [2, 3, 5], [7, 1, 2], 4, 0.5, seed + 1)}
    w = torch.randn(40, 70, generator=g) * (torch.rand(40, 70, generator=g) < 0.05)
    for name, layer in layers.items():
        kern = SparseChainKernel.from_layer(layer)
        for b in (1, 7, 65):
            x = torch.randn(b, kern.n_in, generator=g)
            with torch.no_grad():
                ref = layer.double()(x.double())
                layer.float()
            y = kern(x).double()
            cases.append({"case": name, "batch": b, "rel_error": float((y - ref).norm() / ref.norm())})
    kern = SparseChainKernel.from_dense(w)
    for b in (1, 7, 65):
        x = torch.randn(b, 70, generator=g)
        ref = x.double() @ w.double().t()
        y = kern(x).double()
        cases.append({"case": "sparse 40x70 5%", "batch": b,
                      "rel_error": float((y - ref).norm() / max(ref.norm(), 1e-30))})
    for name, layer in layers.items():  # the training chain: output and every gradient
        for b in (1, 7):
            x = torch.randn(b, layer.in_features, generator=g)
            w_out = torch.randn(b, layer.out_features, generator=g)
            got, want = _train_grads(layer, x, w_out, "kernel"), _train_grads(layer, x, w_out, "chain")
            err = math.inf if got is None else max(float((a.double() - r).norm() / max(r.norm(), 1e-30))
                                                   for a, r in zip(got, want, strict=True))
            cases.append({"case": f"{name} training", "batch": b, "rel_error": err})
    worst = max(c["rel_error"] for c in cases)
    ok = math.isfinite(worst) and worst <= TOLERANCE
    return {"ok": ok, "max_rel_error": worst, "tolerance": TOLERANCE, "cases": cases}


def _train_grads(layer, x, w, path: str) -> list | None:
    """Output and the gradients of input, cores and bias under the loss ``<y, w>``, with
    ``layer`` on ``path`` (float32 for the kernel; ``"chain"`` runs a float64 copy); None
    if the kernel path would not run the kernel."""
    import copy

    import torch

    m = copy.deepcopy(layer).train()
    if path == "chain":
        m, x, w = m.double(), x.double(), w.double()
    m.train_path = path
    xr = x.clone().requires_grad_(True)
    with torch.enable_grad():
        if path == "kernel" and not m.training_on_kernel(xr):
            return None
        y = m(xr)
        (y * w).sum().backward()
    return [y.detach(), xr.grad, *[c.grad for c in m.cores], m.bias.grad]


def report(check: bool = False) -> dict[str, Any]:
    """Compiler, flags, cache, compiled library (or why not), Triton, CUDA; with ``check``
    also the self-test (when the library is available)."""
    import torch

    cpu = build.status()
    out: dict[str, Any] = {"cpu": cpu, "triton": triton_kernels.status(),
                           "cuda": {"available": torch.cuda.is_available(),
                                    "device": torch.cuda.get_device_name(0)
                                    if torch.cuda.is_available() else None}}
    if check and cpu["available"]:
        out["check"] = self_test()
    return out
