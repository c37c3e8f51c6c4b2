"""The cost model (DESIGN §4): seconds a layer is expected to take on each path, from chain
vs dense FLOPs at measured throughputs plus per-call overheads, and where a plan's FLOPs run."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..tensorized.wrappers import TensorizedLSTM
from .modules import core_masks

# Throughputs of DESIGN §4 (one core, fp32): what the estimate assumes before timing.
DENSE_GFLOPS = {1: 25.0, 32: 52.0}
KERNEL_GFLOPS = 30.0
TORCH_CHAIN_GFLOPS = 20.0
CALL_OVERHEAD_S = {"kernel": 3e-6, "dense": 4e-6, "torch_step": 16e-6}


def lstm_flops(layer: nn.Module, name: str, masks: dict[str, Tensor], batch: int) -> dict[str, int]:
    """Multiply-add FLOPs of one time step of an LSTM (all layers and directions) at
    ``batch``: ``dense`` (every weight), ``kernel`` (kept entries: the input projections'
    chains or pruned ``W_ih``, the kept ``W_hh`` entries) and ``torch`` (the module's own
    forward: a tensorized LSTM's fused path is dense work, its loop the chain + dense ``W_hh``)."""
    from ..kernels.lstm import lstm_suffixes

    pre = f"{name}." if name else ""
    h4 = 4 * layer.hidden_size
    out = {"dense": 0, "kernel": 0, "torch": 0}
    tensorized = isinstance(layer, TensorizedLSTM)
    fused = tensorized and layer.fused()
    for idx, sfx in enumerate(lstm_suffixes(layer)):
        w_hh = getattr(layer, f"weight_hh_{sfx}")
        m_hh = masks.get(f"{pre}weight_hh_{sfx}")
        hh_dense, hh_kept = 2 * batch * w_hh.numel(), 2 * batch * int(
            m_hh.sum() if m_hh is not None else (w_hh != 0).sum())
        if tensorized:
            ih = layer.ih[idx]
            ih_dense = 2 * batch * h4 * ih.in_features
            ms = [masks.get(f"{pre}ih.{idx}.cores.{i}") for i in range(len(ih.cores))]
            kept = [m if m is not None else (c != 0) for m, c in zip(ms, ih.cores, strict=True)]
            ih_kept = ih.chain_flops(batch, kept)
            ih_torch = ih_dense if fused else ih.chain_flops(batch)
        else:
            w_ih = getattr(layer, f"weight_ih_{sfx}")
            m_ih = masks.get(f"{pre}weight_ih_{sfx}")
            ih_dense = ih_torch = 2 * batch * w_ih.numel()
            ih_kept = ih_dense if m_ih is None else 2 * batch * int(m_ih.sum())
        out["dense"] += ih_dense + hh_dense
        out["kernel"] += ih_kept + hh_kept
        out["torch"] += ih_torch + hh_dense
    return out


def _lstm_estimate(layer: nn.Module, name: str, masks: dict[str, Tensor], batch: int, choice: str,
                   rate: float) -> float:
    """Seconds per time step (the cost model knows no sequence length; every choice scales
    with it alike, so the ranking holds): FLOPs at the path's throughput plus, for the
    torch loop, its per-step op dispatches."""
    f = lstm_flops(layer, name, masks, batch)
    calls = layer.num_layers * (2 if layer.bidirectional else 1)
    if choice == "kernel":
        return f["kernel"] / KERNEL_GFLOPS / 1e9 + CALL_OVERHEAD_S["kernel"] * calls / 8
    if choice == "dense" or not isinstance(layer, TensorizedLSTM) or layer.fused():
        flops = f["dense" if choice == "dense" else "torch"]
        return flops / rate / 1e9 + CALL_OVERHEAD_S["dense"] * calls / 8
    return f["torch"] / TORCH_CHAIN_GFLOPS / 1e9 + CALL_OVERHEAD_S["torch_step"] * calls


def estimate(layer: nn.Module, name: str, masks: dict[str, Tensor], batch: int, choice: str) -> float:
    """Seconds the cost model expects for one forward of ``batch`` samples (an LSTM: per
    time step)."""
    rate = DENSE_GFLOPS[1] if batch < 8 else DENSE_GFLOPS[32]
    if isinstance(layer, nn.LSTM | TensorizedLSTM):
        return _lstm_estimate(layer, name, masks, batch, choice, rate)
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
        elif isinstance(layer, nn.LSTM | TensorizedLSTM):  # per time step
            f = lstm_flops(layer, name, masks, batch)
            choice = row["choice"]
            if choice == "kernel":
                kern += f["kernel"]
            elif choice == "dense" or not isinstance(layer, TensorizedLSTM) or layer.fused():
                dense += f["dense" if choice == "dense" else "torch"]
            else:
                torch_chain += f["torch"]
            continue
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
