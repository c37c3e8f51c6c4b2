"""Benchmark statistics against known timings (an injected clock), not wall time."""

from __future__ import annotations

import pytest

from tedepr_cli.timing import Plan, interleaved, percentile, speedup, summarize


class FakeClock:
    """Advances only when an engine 'runs': each call to an engine adds its cost."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_percentiles_match_numpy_definition():
    xs = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 25) == 2.0 and percentile(xs, 75) == 4.0
    assert percentile(xs, 90) == pytest.approx(4 + 0.6 * 6)


def test_summary_figures():
    s = summarize([0.010, 0.011, 0.012, 0.013, 0.100], batch=32)
    assert s["median_s"] == 0.012 and s["p50_s"] == 0.012
    assert s["iqr_s"] == pytest.approx(0.002)
    assert s["throughput_per_s"] == pytest.approx(32 / 0.012)
    assert s["mean_s"] == pytest.approx(0.0292)
    assert s["noisy"] is True  # IQR/median = 0.167 > 0.10
    assert summarize([1.0] * 5, 1)["noisy"] is False


def test_interleaved_rotation_warmup_and_paired_speedup():
    clock = FakeClock()
    calls = []
    costs = {"base": 0.004, "fast": 0.001, "mid": 0.002}

    def engine(name):
        def run():
            calls.append(name)
            clock.t += costs[name]
        return run

    times = interleaved({n: engine(n) for n in costs}, Plan(warmup=2, iters=6), clock=clock)
    assert calls[:6] == ["base", "fast", "mid"] * 2  # warm-up rounds, untimed
    timed = calls[6:]
    assert timed[:3] == ["base", "fast", "mid"] and timed[3:6] == ["fast", "mid", "base"]
    assert all(len(v) == 6 for v in times.values())
    assert times["fast"] == [pytest.approx(0.001)] * 6
    sp = speedup(times["base"], times["fast"])
    assert sp["median"] == pytest.approx(4.0) and sp["q1"] == pytest.approx(4.0)


def test_time_budget_plan_stops_after_budget():
    clock = FakeClock()

    def run():
        clock.t += 0.1

    times = interleaved({"a": run}, Plan(warmup=0, seconds=1.0, min_iters=3), clock=clock)
    assert 10 <= len(times["a"]) <= 11
