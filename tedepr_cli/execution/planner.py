"""The planner: per layer and batch size, kernel vs dense vs torch chain, ranked by the cost
model and decided by an interleaved timing on the layer's real input; then fusions; then a
whole-model guard. :func:`build_model` turns a plan into a runnable model."""

from __future__ import annotations

import copy
import fnmatch
from typing import Any

import torch
from torch import Tensor, nn

from .. import timing as timer
from ..artifact import Artifact
from ..errors import UsageError
from ..logs import log
from ..masks import folded_copy
from ..surgery import example_input, swap_module
from .cost import estimate
from .fusion import apply_fusions, plan_fusions
from .modules import CHOICES, candidates, options, unavailable
from .store import PLANNER_VERSION, fingerprint, stored_plan

GUARD_SLACK = 1.05  # the whole model may be at most 5 % slower than its dense rebuild (noise)


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


def plan_execution(art: Artifact, batch: int, threads: int = 1, timing: bool = True,
                   overrides: dict[str, str] | None = None, reps: int = 15, fuse: bool = True,
                   seed: int = 0) -> dict[str, Any]:
    """Choose kernel / dense / torch for every candidate layer of ``art`` at ``batch``, then
    fuse chains of Linear-like layers where that is faster (``fuse=False``: never). The
    timings run on ``batch`` uniform random inputs drawn with ``seed``; the caller's thread
    count is restored afterwards."""
    overrides = overrides or {}
    for pat, c in overrides.items():
        if c not in CHOICES:
            raise UsageError(f"override {pat}={c}: choose one of {', '.join(CHOICES)}")
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _plan(art, batch, threads, timing, overrides, reps, fuse, seed)
    finally:
        torch.set_num_threads(prev_threads)


def _plan(art: Artifact, batch: int, threads: int, timing: bool, overrides: dict[str, str], reps: int,
          fuse: bool, seed: int) -> dict[str, Any]:
    model = folded_copy(art.model).eval()  # what build_model runs: plain weights, eval mode
    cands = candidates(model, art.masks)
    x = example_input(model, art.input_shape, batch, "rand", torch.Generator().manual_seed(seed))
    inputs = _capture_inputs(model, list(cands), x) if timing else {}
    layers: dict[str, Any] = {}
    for name, layer in cands.items():
        opts = options(name, layer, art.masks, threads)
        est = {c: estimate(layer, name, art.masks, batch, c) for c in opts}
        forced = next((c for p, c in overrides.items() if fnmatch.fnmatchcase(name, p)), None)
        row: dict[str, Any] = {"type": type(layer).__name__,
                               "estimate_us": {c: round(1e6 * s, 2) for c, s in est.items()}}
        if unavailable(layer):  # e.g. an LSTM the compiled recurrence does not take: say why
            row["unavailable"] = unavailable(layer)
        if forced is not None:
            if forced not in opts:
                raise UsageError(f"{name} cannot run as {forced!r} here (available: {', '.join(opts)})")
            row.update(choice=forced, reason="override")
        elif timing and name in inputs:
            mods = {c: f() for c, f in opts.items()}
            xin = inputs[name]
            with torch.no_grad():
                t = timer.medians({c: (lambda m=m, xin=xin: m(xin)) for c, m in mods.items()}, reps)
            row["measured_us"] = {c: round(1e6 * s, 2) for c, s in t.items()}
            best = min(t, key=t.get)
            row.update(choice=best, reason="fastest measured")
        else:
            best = min(est, key=est.get)
            row.update(choice=best, reason="cost model" if timing is False else "layer not reached")
        layers[name] = row
    plan = {"planner": PLANNER_VERSION, "batch": batch, "threads": threads, "fingerprint": fingerprint(),
            "layers": layers, "fusions": [], "guard": None}
    if fuse:
        plan_fusions(model, art.masks, lambda p: build_model(art, p, threads), plan, x, threads, timing, reps)
    if timing and (cands or plan["fusions"]):
        plan["guard"] = _guard(art, plan, x, threads, reps)
    return plan


def _guard(art: Artifact, plan: dict[str, Any], x: Tensor, threads: int, reps: int) -> dict[str, Any]:
    """Whole model: planned vs every layer rebuilt dense. Fall back if the plan is slower."""
    planned = build_model(art, plan, threads)
    dense_plan = {**plan, "fusions": [], "layers": {n: {**r, "choice": "dense" if "dense" in options(
        n, art.model.get_submodule(n), art.masks, threads) else r["choice"]}
        for n, r in plan["layers"].items()}}
    dense = build_model(art, dense_plan, threads)
    with torch.no_grad():
        t = timer.medians({"planned": lambda: planned(x), "dense": lambda: dense(x)}, reps)
    out = {"planned_us": round(1e6 * t["planned"], 2), "dense_rebuild_us": round(1e6 * t["dense"], 2),
           "fallback": False}
    if t["planned"] > GUARD_SLACK * t["dense"]:
        log.info(f"execution plan at batch {plan['batch']} was slower than the dense rebuild: using dense")
        for n, r in plan["layers"].items():
            if r["reason"] != "override":
                r["choice"] = dense_plan["layers"][n]["choice"]
                r["reason"] = "whole-model guard: dense rebuild was faster"
            r.pop("fused", None)
        plan["fusions"] = []
        out["fallback"] = True
    return out


def build_model(art: Artifact, plan: dict[str, Any], threads: int = 1) -> nn.Module:
    """A copy of ``art.model`` whose layers run as ``plan`` says (inference only): per-layer
    choices, and each recorded fusion as one :class:`FusedSequence` (the model then is a
    ``torch.fx.GraphModule``, or the fused module itself when the whole model is one run)."""
    src = folded_copy(art.model).eval()  # plain weights: no mask multiply at inference
    model = copy.deepcopy(src)
    fused = {n for f in plan.get("fusions") or [] for n in f["layers"]}
    for name, row in plan["layers"].items():
        if name in fused:
            continue
        layer = model.get_submodule(name)
        choice = row["choice"]
        if choice == "torch" or (choice == "dense" and isinstance(layer, nn.Linear)):
            continue
        opts = options(name, layer, art.masks, threads)
        if choice not in opts:  # e.g. a stored "kernel" plan on a machine without a compiler
            log.warning(f"{name}: {choice!r} is not available here; using its torch forward")
            continue
        swap_module(model, name, opts[choice]())
    if plan.get("fusions"):
        return apply_fusions(src, art.masks, model, plan, threads)
    return model


def plan_for(art: Artifact, batch: int, threads: int = 1, overrides: dict[str, str] | None = None,
             replan: bool = False, seed: int = 0) -> tuple[dict[str, Any], bool]:
    """The stored plan for ``batch`` if it was made on this machine, else a fresh one.
    Returns (plan, fresh)."""
    if not replan and not overrides:
        stored = stored_plan(art, batch, threads)
        if stored is not None:
            return stored, False
    return plan_execution(art, batch, threads, overrides=overrides, seed=seed), True
