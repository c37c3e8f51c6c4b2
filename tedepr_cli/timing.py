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


def interleaved(fns: dict[str, Callable[[], Any]], plan: Plan, clock: Clock = time.perf_counter
                ) -> dict[str, list[float]]:
    """Time every callable once per round, in rotating order, after ``plan.warmup`` rounds."""
    names = list(fns)
    for _ in range(plan.warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    start = clock()
    r = 0
    while True:
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
        for n in order:
            t0 = clock()
            fns[n]()
            times[n].append(clock() - t0)
        r += 1
        if plan.seconds is None:
            if r >= plan.iters:
                break
        elif r >= plan.min_iters and clock() - start >= plan.seconds:
            break
    return times


def medians(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 2,
            clock: Clock = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each callable over ``reps`` interleaved rounds (after
    ``warmup`` rounds): the planner's quick decision between candidates."""
    times = interleaved(fns, Plan(warmup=warmup, iters=reps, min_iters=1), clock)
    return {k: statistics.median(v) for k, v in times.items()}
