"""Timing that survives a noisy shared machine: the one timer of tedepr (``tedepr bench``
and the execution planner both measure through it).

Engines are timed *interleaved* (A B C A B C ...) after a warm-up, so drift (thermal,
other tenants) hits all of them alike; speed-ups are computed from the *paired* per-round
ratios (baseline_i / engine_i), whose median and IQR give the ratio and its spread. The
clock is injectable, so tests can check every figure against known timings.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Clock = Callable[[], float]

NOISY_IQR = 0.10  # IQR / median above this: the machine was too noisy to trust small ratios


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), ``q`` in [0, 100]."""
    if not xs:
        return math.nan
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(times: list[float], batch: int) -> dict[str, Any]:
    """Median, IQR, p50/p90/p99, mean ± σ (seconds) and throughput (samples/s)."""
    med = statistics.median(times)
    q1, q3 = percentile(times, 25), percentile(times, 75)
    return {
        "n": len(times),
        "median_s": med,
        "iqr_s": q3 - q1,
        "p50_s": percentile(times, 50),
        "p90_s": percentile(times, 90),
        "p99_s": percentile(times, 99),
        "mean_s": statistics.fmean(times),
        "std_s": statistics.stdev(times) if len(times) > 1 else 0.0,
        "min_s": min(times),
        "throughput_per_s": batch / med if med > 0 else math.inf,
        "noisy": (q3 - q1) / med > NOISY_IQR if med > 0 else False,
    }


def speedup(baseline: list[float], engine: list[float]) -> dict[str, float]:
    """Paired speed-up ``baseline / engine`` per round: median and IQR of the ratios."""
    ratios = [b / e for b, e in zip(baseline, engine, strict=True) if e > 0]
    return {"median": statistics.median(ratios), "q1": percentile(ratios, 25),
            "q3": percentile(ratios, 75)}


@dataclass
class Plan:
    warmup: int = 5
    iters: int = 50  # rounds, unless `seconds` is set
    seconds: float | None = None  # time budget for the measured rounds (all engines)
    min_iters: int = 5


Timer = Callable[[Callable[[], Any]], float]  # runs a call once, returns its seconds


def wall_timer(clock: Clock = time.perf_counter, synchronize: Callable[[], Any] | None = None) -> Timer:
    """Host wall-clock seconds of one call. With ``synchronize`` (e.g.
    ``torch.cuda.synchronize``) the device is drained before the clock starts and before it
    stops: for engines whose GPU work runs on a stream of their own (onnxruntime's CUDA
    provider), which events recorded on torch's stream would not see."""

    def timer(fn: Callable[[], Any]) -> float:
        if synchronize is not None:
            synchronize()
        t0 = clock()
        fn()
        if synchronize is not None:
            synchronize()
        return clock() - t0

    return timer


def cuda_event_timer(event: Callable[..., Any] | None = None,
                     synchronize: Callable[[], Any] | None = None) -> Timer:
    """Seconds of one call on the GPU's current stream, measured with CUDA events: the
    stream is drained first (so no earlier work is counted), an event is recorded before
    and after the call, and the end event is waited for. The events bracket everything the
    call queued, launch gaps included, so at small batches it is the call's latency.
    ``event``/``synchronize`` default to ``torch.cuda.Event``/``torch.cuda.synchronize``
    (injectable for tests)."""
    if event is None or synchronize is None:
        import torch

        event = event or torch.cuda.Event
        synchronize = synchronize or torch.cuda.synchronize

    def timer(fn: Callable[[], Any]) -> float:
        synchronize()
        start, end = event(enable_timing=True), event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # milliseconds -> seconds

    return timer


def interleaved(fns: dict[str, Callable[[], Any]], plan: Plan, clock: Clock = time.perf_counter,
                timers: dict[str, Timer] | None = None,
                on_round: Callable[[int, int | None], None] | None = None) -> dict[str, list[float]]:
    """Time every callable once per round, in rotating order, after ``plan.warmup`` rounds.

    ``timers`` gives an engine its own :data:`Timer` (CUDA events, a synchronised wall
    clock); the others use ``clock``, which also measures ``plan.seconds``.
    ``on_round(done, total)`` is called after each measured round (``total`` is None with a
    time budget), e.g. for a progress bar."""
    names = list(fns)
    default = wall_timer(clock)
    timer = {n: (timers or {}).get(n, default) for n in names}
    for _ in range(plan.warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    start = clock()
    r = 0
    while True:
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
        for n in order:
            times[n].append(timer[n](fns[n]))
        r += 1
        if on_round is not None:
            on_round(r, plan.iters if plan.seconds is None else None)
        if plan.seconds is None:
            if r >= plan.iters:
                break
        elif r >= plan.min_iters and clock() - start >= plan.seconds:
            break
    return times


def call_clock(threads: int) -> Clock:
    """The clock a decision between engines should use: with one thread the calling
    thread's CPU time (``time.thread_time``: torch and a one-thread onnxruntime session run
    on the calling thread, and time the scheduler gives to other tenants is not counted),
    with more threads the wall clock (CPU time would sum the threads)."""
    return time.thread_time if threads == 1 else time.perf_counter


def medians(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 2,
            clock: Clock = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each callable over ``reps`` interleaved rounds (after
    ``warmup`` rounds): the planner's quick decision between candidates."""
    times = interleaved(fns, Plan(warmup=warmup, iters=reps, min_iters=1), clock)
    return {k: statistics.median(v) for k, v in times.items()}
