"""The execution planner: how each compressed layer should run on *this* machine.

For every tensorized (or pruned dense) layer and a batch size, three ways exist:

* ``kernel`` -- the compiled sparse chain (:mod:`tedepr_cli.kernels`): work proportional to
  the kept core entries, one call per layer;
* ``dense`` -- rebuild the dense weight once and use BLAS: no speed win from the
  factorization, but unbeatable for small layers and large batches;
* ``torch`` -- the chain in torch ops (dense cores): the reference path.

The cost model of DESIGN §4 (chain FLOPs vs dense FLOPs at measured throughputs, plus
per-call overheads) ranks them; a quick interleaved timing of each candidate on the
layer's real input decides. A final whole-model check keeps the plan only if the model is
not slower than its dense rebuild beyond noise (DESIGN: "inference through tedepr is never
slower than the dense model it came from"). Plans are stored in the artifact with a
machine fingerprint and re-made when the machine differs; any layer can be overridden.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .artifact import Artifact
from .console import log
from .errors import UsageError
from .tensorized.base import TensorizedLayer
from .tensorized.conv import ChainConv2d

CHOICES = ("kernel", "dense", "torch")
# Throughputs of DESIGN §4 (one core, fp32): what the estimate assumes before timing.
DENSE_GFLOPS = {1: 25.0, 32: 52.0}
KERNEL_GFLOPS = 30.0
TORCH_CHAIN_GFLOPS = 20.0
CALL_OVERHEAD_S = {"kernel": 3e-6, "dense": 4e-6, "torch_step": 16e-6}
GUARD_SLACK = 1.05  # the whole model may be at most 5 % slower than its dense rebuild (noise)


def fingerprint() -> dict[str, Any]:
    """What makes a plan valid: CPU, torch version, compiled kernel availability/flags."""
    from .kernels import build

    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("", platform.machine()):
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    st = build.status()
    return {"cpu": cpu, "cpu_flags_sha": hashlib.sha256(flags.encode()).hexdigest()[:16],
            "torch": torch.__version__, "kernel": bool(st.get("available")),
            "kernel_flags": st.get("flags")}


# ---------------------------------------------------------------------------- modules
class KernelConv2d(nn.Module):
    """A conv chain whose 1×1 core steps run in the compiled kernel (inference only)."""

    def __init__(self, layer: ChainConv2d, masks: list[Tensor | None], threads: int) -> None:
        from .kernels.cpu import ConvChainKernel

        super().__init__()
        self.layer = layer
        self.kernel = ConvChainKernel(layer, masks, threads)

    def forward(self, x: Tensor) -> Tensor:
        if self.training or x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled():
            return self.layer(x)
        return self.kernel(x)


def _core_masks(name: str, layer: nn.Module, masks: dict[str, Tensor]) -> list[Tensor | None]:
    return [masks.get(f"{name}.cores.{i}") for i in range(len(layer.cores))]


def _dense_module(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        w = layer.dense_weight().detach()
        if isinstance(layer, ChainConv2d):
            m = nn.Conv2d(layer.in_features, layer.out_features, layer.kernel_size, layer.stride,
                          layer.padding, layer.dilation, bias=layer.bias is not None)
        else:
            m = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        m.weight.copy_(w)
        if layer.bias is not None:
            m.bias.copy_(layer.bias.detach())
    return m.eval()


def _kernel_module(name: str, layer: nn.Module, masks: dict[str, Tensor], threads: int) -> nn.Module:
    from .kernels.cpu import KernelLinear

    if isinstance(layer, ChainConv2d):
        return KernelConv2d(layer, _core_masks(name, layer, masks), threads).eval()
    if isinstance(layer, nn.Linear):
        return KernelLinear(layer, masks.get(f"{name}.weight"), threads).eval()
    return KernelLinear(layer, _core_masks(name, layer, masks), threads).eval()


def candidates(model: nn.Module, masks: dict[str, Tensor]) -> dict[str, nn.Module]:
    """Layers the planner decides for: tensorized layers and pruned ``nn.Linear``s."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, TensorizedLayer) or (isinstance(mod, nn.Linear) and f"{name}.weight" in masks):
            out[name] = mod
    return out


def options(name: str, layer: nn.Module, masks: dict[str, Tensor], threads: int
            ) -> dict[str, Callable[[], nn.Module]]:
    """The ways ``layer`` can run here, as module factories."""
    from .kernels import build
    from .kernels.cpu import supports

    opts: dict[str, Callable[[], nn.Module]] = {}
    if isinstance(layer, nn.Linear):  # a pruned dense layer: BLAS or the 1-core sparse chain
        opts["dense"] = lambda: layer
        if build.available():
            opts["kernel"] = lambda: _kernel_module(name, layer, masks, threads)
        return opts
    opts["torch"] = lambda: layer
    if layer.chain == "linear":
        opts["dense"] = lambda: _dense_module(layer)
        if build.available() and supports(layer):
            opts["kernel"] = lambda: _kernel_module(name, layer, masks, threads)
    return opts


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
        ms = _core_masks(name, layer, masks)
        kept = [m if m is not None else (c != 0) for m, c in zip(ms, layer.cores, strict=True)]
        return layer.chain_flops(batch, kept) / KERNEL_GFLOPS / 1e9 + CALL_OVERHEAD_S["kernel"]
    return (layer.chain_flops(batch) / TORCH_CHAIN_GFLOPS / 1e9
            + CALL_OVERHEAD_S["torch_step"] * len(layer.cores))


def _time(fns: dict[str, Callable[[], Any]], reps: int, clock=time.perf_counter) -> dict[str, float]:
    """Median seconds per call, interleaved so drift hits every candidate alike."""
    for f in fns.values():
        f()
        f()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = clock()
            f()
            ts[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def _capture_inputs(model: nn.Module, names: list[str], x: Tensor) -> dict[str, Tensor]:
    seen: dict[str, Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen.setdefault(n, a[0].detach().clone())) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def plan_execution(art: Artifact, batch: int, threads: int = 1, timing: bool = True,
                   overrides: dict[str, str] | None = None, reps: int = 15) -> dict[str, Any]:
    """Choose kernel / dense / torch for every candidate layer of ``art`` at ``batch``."""
    overrides = overrides or {}
    for pat, c in overrides.items():
        if c not in CHOICES:
            raise UsageError(f"override {pat}={c}: choose one of {', '.join(CHOICES)}")
    torch.set_num_threads(threads)
    model = art.model.eval()
    cands = candidates(model, art.masks)
    x = torch.rand(batch, *art.input_shape, generator=torch.Generator().manual_seed(0))
    inputs = _capture_inputs(model, list(cands), x) if timing else {}
    layers: dict[str, Any] = {}
    for name, layer in cands.items():
        opts = options(name, layer, art.masks, threads)
        est = {c: estimate(layer, name, art.masks, batch, c) for c in opts}
        forced = next((c for p, c in overrides.items() if fnmatch.fnmatchcase(name, p)), None)
        row: dict[str, Any] = {"type": type(layer).__name__,
                               "estimate_us": {c: round(1e6 * s, 2) for c, s in est.items()}}
        if forced is not None:
            if forced not in opts:
                raise UsageError(f"{name} cannot run as {forced!r} here (available: {', '.join(opts)})")
            row.update(choice=forced, reason="override")
        elif timing and name in inputs:
            mods = {c: f() for c, f in opts.items()}
            xin = inputs[name]
            with torch.no_grad():
                t = _time({c: (lambda m=m, xin=xin: m(xin)) for c, m in mods.items()}, reps)
            row["measured_us"] = {c: round(1e6 * s, 2) for c, s in t.items()}
            best = min(t, key=t.get)
            row.update(choice=best, reason="fastest measured")
        else:
            best = min(est, key=est.get)
            row.update(choice=best, reason="cost model" if timing is False else "layer not reached")
        layers[name] = row
    plan = {"batch": batch, "threads": threads, "fingerprint": fingerprint(), "layers": layers,
            "guard": None}
    if timing and cands:
        plan["guard"] = _guard(art, plan, x, threads, reps)
    return plan


def _guard(art: Artifact, plan: dict[str, Any], x: Tensor, threads: int, reps: int) -> dict[str, Any]:
    """Whole model: planned vs every layer rebuilt dense. Fall back if the plan is slower."""
    planned = build_model(art, plan, threads)
    dense_plan = {**plan, "layers": {n: {**r, "choice": "dense" if "dense" in options(
        n, art.model.get_submodule(n), art.masks, threads) else r["choice"]}
        for n, r in plan["layers"].items()}}
    dense = build_model(art, dense_plan, threads)
    with torch.no_grad():
        t = _time({"planned": lambda: planned(x), "dense": lambda: dense(x)}, reps)
    out = {"planned_us": round(1e6 * t["planned"], 2), "dense_rebuild_us": round(1e6 * t["dense"], 2),
           "fallback": False}
    if t["planned"] > GUARD_SLACK * t["dense"]:
        log.info(f"execution plan at batch {plan['batch']} was slower than the dense rebuild: using dense")
        for n, r in plan["layers"].items():
            if r["reason"] != "override":
                r["choice"] = dense_plan["layers"][n]["choice"]
                r["reason"] = "whole-model guard: dense rebuild was faster"
        out["fallback"] = True
    return out


def build_model(art: Artifact, plan: dict[str, Any], threads: int = 1) -> nn.Module:
    """A copy of ``art.model`` whose layers run as ``plan`` says (inference only)."""
    model = copy.deepcopy(art.model).eval()
    for name, row in plan["layers"].items():
        layer = model.get_submodule(name)
        choice = row["choice"]
        if choice == "torch" or (choice == "dense" and isinstance(layer, nn.Linear)):
            continue
        opts = options(name, layer, art.masks, threads)
        if choice not in opts:  # e.g. a stored "kernel" plan on a machine without a compiler
            log.warning(f"{name}: {choice!r} is not available here; using its torch forward")
            continue
        _set(model, name, opts[choice]())
    return model


def plan_for(art: Artifact, batch: int, threads: int = 1, overrides: dict[str, str] | None = None,
             replan: bool = False) -> tuple[dict[str, Any], bool]:
    """The stored plan for ``batch`` if it was made on this machine, else a fresh one.
    Returns (plan, fresh)."""
    stored = (art.meta.get("execution") or {}).get("plans", {}).get(str(batch))
    if stored and not replan and not overrides and stored.get("fingerprint") == fingerprint() \
            and stored.get("threads") == threads:
        return stored, False
    if stored and not replan and not overrides:
        log.info(f"stored execution plan for batch {batch} was made on another machine: re-planning")
    return plan_execution(art, batch, threads, overrides=overrides), True


def flop_share(art: Artifact, plan: dict[str, Any]) -> dict[str, Any]:
    """FLOPs of one forward by where they run: sparse/factorized kernels vs dense."""
    batch = plan["batch"]
    kern = dense = torch_chain = 0
    for name, row in plan["layers"].items():
        layer = art.model.get_submodule(name)
        if isinstance(layer, nn.Linear):
            f_dense = 2 * batch * layer.in_features * layer.out_features
            f_kern = 2 * batch * int(art.masks[f"{name}.weight"].sum())
        else:
            ms = _core_masks(name, layer, art.masks)
            kept = [m if m is not None else (c != 0) for m, c in zip(ms, layer.cores, strict=True)]
            f_dense, f_kern = layer.dense_flops(batch), layer.chain_flops(batch, kept)
        if row["choice"] == "kernel":
            kern += f_kern
        elif row["choice"] == "dense":
            dense += f_dense
        else:
            torch_chain += layer.chain_flops(batch) if not isinstance(layer, nn.Linear) else f_dense
    total = kern + dense + torch_chain
    return {"kernel_flops": kern, "dense_flops": dense, "torch_chain_flops": torch_chain,
            "share_on_sparse_or_factorized": (kern + torch_chain) / total if total else 0.0}
