"""Benchmark statistics against known timings (an injected clock), not wall time."""

from __future__ import annotations

import pytest

from tedepr_cli.timing import (
    Plan,
    cuda_event_timer,
    interleaved,
    percentile,
    speedup,
    summarize,
    wall_timer,
)


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


class FakeGPU:
    """A stream that only moves when work is queued: ``run(ms)`` queues a kernel; events
    stamp the stream's time when recorded; ``synchronize`` drains the queue."""

    def __init__(self):
        self.queued_ms = 0.0  # work not yet done
        self.done_ms = 0.0  # stream time when the queue is drained
        self.log = []

    def synchronize(self):
        self.log.append("sync")
        self.done_ms += self.queued_ms
        self.queued_ms = 0.0

    def run(self, ms):
        self.log.append("run")
        self.queued_ms += ms

    def event(self, enable_timing=False):
        gpu = self
        assert enable_timing

        class Event:
            def record(self):
                gpu.log.append("record")
                self.t = gpu.done_ms + gpu.queued_ms

            def synchronize(self):
                gpu.log.append("event-sync")
                gpu.synchronize()

            def elapsed_time(self, other):
                return other.t - self.t

        return Event()


def test_cuda_event_timer_brackets_the_call_and_excludes_earlier_work():
    gpu = FakeGPU()
    timer = cuda_event_timer(gpu.event, gpu.synchronize)
    gpu.run(50.0)  # an earlier engine's kernels, still queued: not ours
    assert timer(lambda: gpu.run(2.5)) == pytest.approx(2.5e-3)  # ms -> s
    assert gpu.log == ["run", "sync", "record", "run", "record", "event-sync", "sync"]
    times = interleaved({"a": lambda: gpu.run(1.0), "b": lambda: gpu.run(3.0)}, Plan(warmup=1, iters=4),
                        timers={"a": timer, "b": timer})
    assert times == {"a": [pytest.approx(1e-3)] * 4, "b": [pytest.approx(3e-3)] * 4}


def test_synchronised_wall_timer_waits_for_the_device():
    clock, gpu = FakeClock(), FakeGPU()

    def sync():
        clock.t += gpu.queued_ms / 1e3  # the host waits for the queued work
        gpu.synchronize()

    timer = wall_timer(clock, synchronize=sync)
    gpu.run(40.0)  # earlier work: drained before the clock starts
    assert timer(lambda: gpu.run(5.0)) == pytest.approx(5e-3)
    assert wall_timer(clock)(lambda: gpu.run(5.0)) == 0.0  # unsynchronised: only the launch


def test_on_round_reports_progress():
    seen = []
    interleaved({"a": lambda: None}, Plan(warmup=0, iters=3), on_round=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    seen.clear()
    interleaved({"a": lambda: None}, Plan(warmup=0, seconds=1e-9, min_iters=2),
                on_round=lambda d, t: seen.append((d, t)))
    assert seen == [(1, None), (2, None)]
