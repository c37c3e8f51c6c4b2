"""The cost model (DESIGN §4): seconds a layer is expected to take on each path, from chain
vs dense FLOPs at measured throughputs plus per-call overheads, and where a plan's FLOPs run."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .modules import core_masks

# Throughputs of DESIGN §4 (one core, fp32): what the estimate assumes before timing.
DENSE_GFLOPS = {1: 25.0, 32: 52.0}
KERNEL_GFLOPS = 30.0
TORCH_CHAIN_GFLOPS = 20.0
CALL_OVERHEAD_S = {"kernel": 3e-6, "dense": 4e-6, "torch_step": 16e-6}


def estimate(layer: nn.Module, name: str, masks: dict[str, Tensor], batch: int, choice: str) -> float:
    """Seconds the cost model expects for one forward of ``batch`` samples."""
    rate = DENSE_GFLOPS[1] if batch < 8 else DENSE_GFLOPS[32]
    if isinstance(layer, nn.Linear):
        dense = 2 * batch * layer.in_features * layer.out_features
        kept = int(masks[f"{name}.weight"].sum())
        return (dense / rate / 1e9 + CALL_OVERHEAD_S["dense"] if choice == "dense"
                else 2 * batch * kept / KERNEL_GFLOPS / 1e9 + CALL_OVERHEAD_S["kernel"])
    if choice == "dense":
        return layer.dense_flops(batch) / rate / 1e9 + CALL_OVERHEAD_S["dense"]
    if choice == "kernel":
        ms = core_masks(name, layer, masks)
        kept = [m if m is not None else (c != 0) for m, c in zip(ms, layer.cores, strict=True)]
        return layer.chain_flops(batch, kept) / KERNEL_GFLOPS / 1e9 + CALL_OVERHEAD_S["kernel"]
    return (layer.chain_flops(batch) / TORCH_CHAIN_GFLOPS / 1e9
            + CALL_OVERHEAD_S["torch_step"] * len(layer.cores))


def fused_flops(layer: nn.Module, name: str, masks: dict[str, Tensor], variant: str, batch: int) -> int:
    """FLOPs of one layer of a fused run, packed as ``variant`` (see :func:`.fusion.variant`)."""
    if variant == "matrix":
        m = masks.get(f"{name}.weight")
        kept = int(m.sum()) if m is not None else int((layer.weight != 0).sum())
        return 2 * batch * kept
    if variant == "dense":
        return layer.dense_flops(batch)
    ms = core_masks(name, layer, masks)
    kept = [m if m is not None else (c != 0) for m, c in zip(ms, layer.cores, strict=True)]
    return layer.chain_flops(batch, kept)


def row_estimate_s(row: dict[str, Any] | None) -> float:
    """The cost model's seconds for a planned layer (a plain, unplanned Linear: one dense call)."""
    if row is None:
        return CALL_OVERHEAD_S["dense"]
    return row["estimate_us"][row["choice"]] / 1e6


def flop_share(model: nn.Module, masks: dict[str, Tensor], plan: dict[str, Any]) -> dict[str, Any]:
    """FLOPs of one forward by where they run: sparse/factorized kernels vs dense."""
    batch = plan["batch"]
    kern = dense = torch_chain = 0
    variant = {n: v for f in plan.get("fusions") or []
               for n, v in zip(f["layers"], f["variants"], strict=True)}
    for name, row in plan["layers"].items():
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Linear):
            f_dense = 2 * batch * layer.in_features * layer.out_features
            f_kern = 2 * batch * int(masks[f"{name}.weight"].sum())
        else:
            ms = core_masks(name, layer, masks)
            kept = [m if m is not None else (c != 0) for m, c in zip(ms, layer.cores, strict=True)]
            f_dense, f_kern = layer.dense_flops(batch), layer.chain_flops(batch, kept)
        choice = row["choice"]
        if name in variant:  # fused: the chain runs in the kernel, a rebuilt matrix is dense work
            choice = "dense" if variant[name] == "dense" else "kernel"
        if choice == "kernel":
            kern += f_kern
        elif choice == "dense":
            dense += f_dense
        else:
            torch_chain += layer.chain_flops(batch) if not isinstance(layer, nn.Linear) else f_dense
    total = kern + dense + torch_chain
    return {"kernel_flops": kern, "dense_flops": dense, "torch_chain_flops": torch_chain,
            "share_on_sparse_or_factorized": (kern + torch_chain) / total if total else 0.0}
