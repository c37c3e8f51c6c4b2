"""The planner: per layer and batch size, kernel vs dense vs torch chain, ranked by the cost
model and decided by an interleaved timing on the layer's real input; then fusions; then the
whole-model runtime (:mod:`.runtimes`: that per-layer plan, the compressed ONNX in
onnxruntime, or the dense model on torch or onnxruntime), decided against the *original*
dense model on its best runtime. :func:`build_model` turns a plan into a runnable model;
:func:`plan_for` reuses a stored plan after a cheap re-check."""

from __future__ import annotations

import copy
import fnmatch
import statistics
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
from .fusion import apply_fusions, outputs_rel_err, plan_fusions
from .modules import CHOICES, candidates, options, unavailable
from .runtimes import COMPRESSED, DENSE, ONNX_RTOL, ORT_LEVELS, RUNTIMES, Runtimes, renamed_plan, runtime_name
from .store import PLANNER_VERSION, fingerprint, stored_plan

LAYER_REPS = 25  # interleaved rounds per layer decision (medians of per-call CPU time)
RUNTIME_ROUNDS = 25  # interleaved rounds of the whole-model runtimes against the dense original
RECHECK_ROUNDS = 5  # interleaved rounds of a stored plan's re-check at load
RECHECK_SLACK = 1.25  # a stored plan "clearly slower" than dense: median above this x dense's


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
                   overrides: dict[str, str] | None = None, reps: int = LAYER_REPS, fuse: bool = True,
                   seed: int = 0, runtimes: Runtimes | None = None, runtime: str | None = None,
                   rounds: int = RUNTIME_ROUNDS) -> dict[str, Any]:
    """Choose kernel / dense / torch for every candidate layer of ``art`` at ``batch``, fuse
    chains of Linear-like layers where that is faster (``fuse=False``: never), then the
    whole-model runtime (``plan["runtime"]``, one of :data:`.runtimes.RUNTIMES`): the fastest
    compressed runtime if it beats the original dense model on its best runtime (dense torch
    or dense onnxruntime), else that dense runtime (the plan says so). The timings run on
    ``batch`` uniform random inputs drawn with ``seed``, interleaved, medians of per-call
    CPU time (wall time with ``threads > 1``); ``timing=False`` decides layers by the cost
    model and keeps the ``layers`` runtime unmeasured; ``runtime`` forces one runtime
    (unmeasured). ``reps``/``rounds``: interleaved rounds of each layer / whole-model
    decision. ``runtimes`` shares built runtimes between calls. The caller's thread
    count is restored afterwards. Raises ``UsageError`` for an unknown override."""
    overrides = overrides or {}
    for pat, c in overrides.items():
        if c not in CHOICES:
            raise UsageError(f"override {pat}={c}: choose one of {', '.join(CHOICES)}")
    if runtime is not None:
        runtime = runtime_name(runtime)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _plan(art, batch, threads, timing, overrides, reps, fuse, seed,
                     runtimes or Runtimes(art, threads, seed), runtime, rounds)
    finally:
        torch.set_num_threads(prev_threads)


def _plan(art: Artifact, batch: int, threads: int, timing: bool, overrides: dict[str, str], reps: int,
          fuse: bool, seed: int, rt: Runtimes, runtime: str | None, rounds: int) -> dict[str, Any]:
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
                t = timer.medians({c: (lambda m=m, xin=xin: m(xin)) for c, m in mods.items()}, reps,
                                  clock=timer.call_clock(threads))
            row["measured_us"] = {c: round(1e6 * s, 2) for c, s in t.items()}
            best = min(t, key=t.get)
            row.update(choice=best, reason="fastest measured")
        else:
            best = min(est, key=est.get)
            row.update(choice=best, reason="cost model" if timing is False else "layer not reached")
        layers[name] = row
    plan = {"planner": PLANNER_VERSION, "batch": batch, "threads": threads, "fingerprint": fingerprint(),
            "layers": layers, "fusions": [], "runtime": "layers", "runtimes": None}
    if fuse:
        plan_fusions(model, art.masks, lambda p: build_layers(art, p, threads), plan, x, threads, timing,
                     reps)
    if runtime is not None:
        plan["runtimes"] = {"chosen": runtime, "reason": "override"}
        plan["runtime"] = runtime
    elif timing:
        plan["runtimes"] = _choose_runtime(rt, plan, model, x, threads, rounds)
        plan["runtime"] = plan["runtimes"]["chosen"]
    else:
        plan["runtimes"] = {"chosen": "layers", "reason": "not measured (cost model only)"}
    return plan


def _time_rounds(fns: dict[str, Any], rounds: int, threads: int) -> dict[str, list[float]]:
    """Per-call seconds of each callable over ``rounds`` interleaved rounds (rotating order),
    each timed call right after an untimed call of the same callable: the steady state of
    back-to-back inference, whatever engine ran before it in the round."""
    clock = timer.call_clock(threads)
    once = timer.wall_timer(clock)

    def hot(fn: Any) -> float:
        fn()
        return once(fn)

    with torch.no_grad():
        return timer.interleaved(fns, timer.Plan(warmup=2, iters=rounds, min_iters=1), clock=clock,
                                 timers={k: hot for k in fns})


def _paired(a: list[float], b: list[float]) -> float:
    """Median of the per-round ratios a_i / b_i (below 1: a was faster)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True) if y > 0)


def _best_levels(times: dict[str, list[float]]) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Collapse the onnxruntime level variants (``NAME@LEVEL``; ``NAME`` alone is ``all``)
    into ``NAME`` with the times of its fastest level by median; returns the collapsed
    times and ``NAME -> level`` for the onnxruntime runtimes that had variants."""
    groups: dict[str, dict[str, list[float]]] = {}
    for k, v in times.items():
        name, _, level = k.partition("@")
        groups.setdefault(name, {})[level or "all"] = v
    out, levels = {}, {}
    for name, by in groups.items():
        best = min(by, key=lambda lv: (statistics.median(by[lv]), ORT_LEVELS.index(lv)))
        out[name] = by[best]
        if len(by) > 1:
            levels[name] = best
    return out, levels


def _runs(m: nn.Module, x: Tensor, ref: Any = None) -> bool:
    """Whether ``m`` runs on ``x`` (and, given ``ref``, equals it within
    :data:`.runtimes.ONNX_RTOL`): an onnxruntime level variant that fails is left out."""
    try:
        with torch.no_grad():
            y = m(x)
    except Exception:  # noqa: BLE001 - e.g. onnxruntime refuses the graph at this level
        return False
    return ref is None or outputs_rel_err(y, ref) <= ONNX_RTOL


def _choose_runtime(rt: Runtimes, plan: dict[str, Any], model: nn.Module, x: Tensor, threads: int,
                    rounds: int) -> dict[str, Any]:
    """Time every runtime of the compressed model and the dense original on torch and
    onnxruntime, interleaved, each onnxruntime one at every graph optimization level of
    :data:`.runtimes.ORT_LEVELS` (its fastest level is its time, and is what it then runs
    at: ``ort_levels``, also set in ``rt.levels``); choose the fastest compressed runtime
    only if its median is below the best dense median *and* it won the majority of the
    paired rounds, else the dense model on the dense original's best runtime. Runtimes
    whose output differs from the torch model by more than :data:`.runtimes.ONNX_RTOL` are
    not considered."""
    with torch.no_grad():
        ref = model(x)
    fns: dict[str, Any] = {}
    errs: dict[str, float] = {}
    for r in RUNTIMES:
        m = build_layers(rt.art, plan, threads) if r == "layers" else rt.module(r, level="all")
        if m is None:
            continue
        try:
            with torch.no_grad():
                err = outputs_rel_err(m(x), ref)
        except Exception as e:  # e.g. onnxruntime refuses an exported op at run time
            rt.unavailable[r] = f"fails at run time: {str(e).splitlines()[0][:200]}"
            continue
        if err > ONNX_RTOL:
            rt.unavailable[r] = f"output differs from the torch model by {err:.1e} relative"
            continue
        errs[r] = float(f"{err:.3g}")
        if r in COMPRESSED:
            fns[r] = lambda m=m: m(x)
            if r == "chain-ort":
                for lv in ORT_LEVELS[1:]:
                    alt = rt.module(r, level=lv)
                    if alt is not None and _runs(alt, x, ref):
                        fns[f"{r}@{lv}"] = lambda m=alt: m(x)
    for r in DENSE:
        b = rt.baseline(r, level="all")
        if b is None:
            continue
        try:
            with torch.no_grad():
                b(x)
        except Exception as e:  # the dense original's export does not run here
            rt.unavailable[f"original:{r}"] = f"fails at run time: {str(e).splitlines()[0][:200]}"
            continue
        fns[f"original:{r}"] = lambda b=b: b(x)
        if r == "dense-ort":
            for lv in ORT_LEVELS[1:]:
                alt = rt.baseline(r, level=lv)
                if alt is not None and _runs(alt, x):
                    fns[f"original:{r}@{lv}"] = lambda b=alt: b(x)
    times, levels = _best_levels(_time_rounds(fns, rounds, threads))
    ort_levels = {k.removeprefix("original:"): v for k, v in levels.items()}  # chain-ort, dense-ort
    _use_levels(rt, ort_levels)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = [k for k in times if k.startswith("original:")]
    comp = [k for k in times if k in COMPRESSED]
    out: dict[str, Any] = {
        "measured_us": {k.removeprefix("original:"): round(1e6 * v, 2) for k, v in med.items()},
        "rounds": rounds, "clock": "thread CPU time" if threads == 1 else "wall clock",
        "baseline": {"model": rt.baseline_source}, "max_rel_err": errs,
        "unavailable": dict(rt.unavailable), "ort_levels": ort_levels}
    best_comp = min(comp, key=med.get) if comp else None
    if not base:  # no dense original to compare with: the fastest compressed runtime
        out.update(chosen=best_comp or "layers", reason="no dense runtime could be measured")
        return out
    best_dense = min(base, key=med.get)
    dense_rt = best_dense.removeprefix("original:")
    out["baseline"].update(best=dense_rt, median_us=round(1e6 * med[best_dense], 2))
    if best_comp is not None:
        ratio = _paired(times[best_comp], times[best_dense])
        out["speedup_vs_best_dense"] = round(med[best_dense] / med[best_comp], 3)
        out["paired_ratio"] = round(ratio, 3)
        if med[best_comp] < med[best_dense] and ratio < 1.0:
            out.update(chosen=best_comp, reason=f"fastest measured: {out['speedup_vs_best_dense']}x the "
                                                f"dense original on {dense_rt}")
            return out
    if dense_rt in errs:
        log.info(f"batch {plan['batch']}: no compressed runtime beats the dense original on {dense_rt} "
                 f"({', '.join(f'{k} {v} µs' for k, v in out['measured_us'].items())}): running dense")
        out.update(chosen=dense_rt, reason=f"nothing beats dense: the dense model runs on {dense_rt}")
        return out
    out.update(chosen=best_comp or "layers",
               reason=f"nothing beats dense, but the dense model cannot run here ("
                      f"{rt.unavailable.get(dense_rt, 'unavailable')}): the fastest compressed runtime")
    return out


def build_layers(art: Artifact, plan: dict[str, Any], threads: int = 1) -> nn.Module:
    """The ``layers`` runtime: a copy of ``art.model`` whose layers run as ``plan`` says
    (inference only): per-layer choices, and each recorded fusion as one
    :class:`FusedSequence` (the model then is a ``torch.fx.GraphModule``, or the fused module
    itself when the whole model is one run)."""
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


def _use_levels(rt: Runtimes, ort_levels: dict[str, str]) -> None:
    """Set ``rt``'s onnxruntime levels from a plan's ``ort_levels``: ``chain-ort``'s, and
    ``dense-ort``'s for both the dense original and the compressed model rebuilt dense (the
    dense fallback: the same layer types). Levels not in :data:`.runtimes.ORT_LEVELS` (a
    plan from elsewhere) are ignored."""
    lv = {k: v for k, v in (ort_levels or {}).items() if v in ORT_LEVELS}
    if "chain-ort" in lv:
        rt.levels["chain-ort"] = lv["chain-ort"]
    if "dense-ort" in lv:
        rt.levels["dense-ort"] = rt.levels["original:dense-ort"] = lv["dense-ort"]


def build_model(art: Artifact, plan: dict[str, Any], threads: int = 1, runtime: str | None = None,
                runtimes: Runtimes | None = None) -> nn.Module:
    """The compressed model of ``art`` running on the plan's runtime (``runtime``: another
    one of :data:`.runtimes.RUNTIMES`), inference only, taking and returning torch tensors:
    the per-layer plan (:func:`build_layers`), an :class:`~.runtimes.OrtModule` over the
    compressed ONNX, or the dense model on torch or onnxruntime. A runtime that cannot be
    built here falls back (with a warning) to the dense model in torch, then to the layers."""
    rt = runtimes or Runtimes(art, threads)
    _use_levels(rt, (plan.get("runtimes") or {}).get("ort_levels") or {})
    want = runtime_name(runtime) if runtime else renamed_plan(plan).get("runtime") or "layers"
    for r in dict.fromkeys([want, "dense-torch" if want in DENSE else want, "layers"]):
        m = build_layers(art, plan, threads) if r == "layers" else rt.module(r)
        if m is not None:
            if r != want:
                log.warning(f"runtime {want} cannot run here ({rt.unavailable.get(want)}): using {r}")
            return m
    raise AssertionError("the layers runtime always builds")  # pragma: no cover


def recheck(art: Artifact, plan: dict[str, Any], threads: int = 1, seed: int = 0,
            runtimes: Runtimes | None = None) -> dict[str, Any]:
    """A cheap re-check of a stored plan at load: :data:`RECHECK_ROUNDS` interleaved rounds of
    its runtime against the dense model on the dense original's best runtime. Returns the
    plan with ``recheck`` filled in; if the chosen runtime is now more than
    :data:`RECHECK_SLACK` x slower, a copy that runs dense (and says so)."""
    chosen = plan.get("runtime") or "layers"
    dense_rt = ((plan.get("runtimes") or {}).get("baseline") or {}).get("best") or "dense-torch"
    if chosen in DENSE:
        return {**plan, "recheck": {"skipped": "the plan already runs dense"}}
    if (plan.get("runtimes") or {}).get("reason") == "override":
        return {**plan, "recheck": {"skipped": "the runtime was forced"}}
    rt = runtimes or Runtimes(art, threads, seed)
    _use_levels(rt, (plan.get("runtimes") or {}).get("ort_levels") or {})
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dense = rt.module(dense_rt)
        if dense is None:
            return {**plan, "recheck": {"skipped": f"{dense_rt}: {rt.unavailable.get(dense_rt)}"}}
        fast = build_model(art, plan, threads, runtimes=rt)
        x = example_input(art.model, art.input_shape, plan["batch"], "rand",  # token ids for embeddings
                          torch.Generator().manual_seed(seed))
        t = _time_rounds({"chosen": lambda: fast(x), "dense": lambda: dense(x)}, RECHECK_ROUNDS, threads)
    finally:
        torch.set_num_threads(prev)
    c, d = statistics.median(t["chosen"]), statistics.median(t["dense"])
    check = {"rounds": RECHECK_ROUNDS, "chosen_us": round(1e6 * c, 2), f"{dense_rt}_us": round(1e6 * d, 2),
             "fallback": c > RECHECK_SLACK * d}
    if not check["fallback"]:
        return {**plan, "recheck": check}
    log.warning(f"the stored plan for batch {plan['batch']} ({chosen}) now takes {1e6 * c:.1f} µs, more than "
                f"{RECHECK_SLACK} x the dense model on {dense_rt} ({1e6 * d:.1f} µs): running dense "
                "(`tedepr plan` re-measures)")
    return {**plan, "runtime": dense_rt, "recheck": check}


def plan_for(art: Artifact, batch: int, threads: int = 1, overrides: dict[str, str] | None = None,
             replan: bool = False, seed: int = 0, check: bool = True, runtimes: Runtimes | None = None
             ) -> tuple[dict[str, Any], bool]:
    """The stored plan for ``batch`` if it was made on this machine (re-checked with
    :func:`recheck` unless ``check=False``), else a fresh one. Returns (plan, fresh)."""
    if not replan and not overrides:
        stored = stored_plan(art, batch, threads)
        if stored is not None:
            return (recheck(art, stored, threads, seed, runtimes) if check else stored), False
    return plan_execution(art, batch, threads, overrides=overrides, seed=seed, runtimes=runtimes), True
