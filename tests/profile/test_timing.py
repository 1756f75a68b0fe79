"""Timing arithmetic with a scripted clock: nothing here reads real time."""
from __future__ import annotations

import pytest

from seqtool.profile.measure import measure_length
from seqtool.profile.timing import (Stopwatch, TimingStats, decode_rate, percentile, time_decode, time_prefill)


class ScriptedClock:
    def __init__(self, times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


def test_percentile_matches_linear_interpolation():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    assert percentile([5.0], 90) == 5.0
    stats = TimingStats.of([3.0, 1.0, 2.0])
    assert (stats.median, stats.min, stats.mean, stats.n) == (2.0, 1.0, 2.0, 3)
    assert stats.p90 == pytest.approx(2.8)


def test_stopwatch_syncs_before_every_read():
    events = []
    clock = ScriptedClock([10.0, 10.5, 12.0])
    watch = Stopwatch(lambda: (events.append("read"), clock())[1], lambda: events.append("sync"))
    watch.start()
    assert watch.lap() == pytest.approx(0.5)
    assert watch.lap() == pytest.approx(1.5)
    assert events == ["sync", "read"] * 3


def test_time_prefill_reads_clock_three_times_per_repeat_and_never_in_warmup():
    # repeat 1: start 0, forward done 2, token 2.5; repeat 2: start 3, forward done 4, token 4.25
    clock = ScriptedClock([0.0, 2.0, 2.5, 3.0, 4.0, 4.25])
    calls = []
    timing, token = time_prefill(lambda: calls.append("fwd") or "logits", lambda out: ("tok", out),
                                 warmup=2, repeats=2, watch=Stopwatch(clock))
    assert calls == ["fwd"] * 4  # 2 warmup + 2 timed
    assert timing.prefill == pytest.approx([2.0, 1.0])
    assert timing.ttft == pytest.approx([2.5, 1.25])
    assert token == ("tok", "logits")
    assert clock.times == []


def test_time_decode_and_rate():
    clock = ScriptedClock([1.0, 1.1, 1.3, 1.6])
    steps = []
    laps = time_decode(lambda: steps.append(1), 3, watch=Stopwatch(clock))
    assert laps == pytest.approx([0.1, 0.2, 0.3])
    assert len(steps) == 3
    per_token, rate = decode_rate(laps, batch=2)
    assert per_token == pytest.approx(0.2)
    assert rate == pytest.approx(2 * 3 / 0.6)


def test_measure_length_uses_the_injected_clock(tiny_models, step_clock):
    row = measure_length(tiny_models["tiny-llama"], seq_len=24, batch=2, decode_tokens=3, warmup=1, repeats=4,
                         clock=step_clock)
    # every clock read advances 0.25 s: forward = 1 read, first token = 1 more read, each decode step = 1 read
    assert row["prefill_samples_s"] == pytest.approx([0.25] * 4)
    assert row["prefill_median_s"] == pytest.approx(0.25)
    assert row["ttft_s"] == pytest.approx(0.5)
    assert row["decode_s_per_token"] == pytest.approx(0.25)
    assert row["decode_tokens_per_s"] == pytest.approx(2 / 0.25)
    assert step_clock.reads == 4 * 3 + 1 + 3
