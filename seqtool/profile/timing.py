"""Latency measurement with an injectable clock, so the arithmetic is testable without timing anything.

A ``Clock`` is a zero-argument callable returning seconds (``time.perf_counter`` by default); a ``sync``
callable (``torch.cuda.synchronize`` on GPU) runs before every clock read so queued device work is counted.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

Clock = Callable[[], float]


def _no_sync() -> None:
    return None


@dataclass
class Stopwatch:
    """Reads ``clock`` after ``sync``: ``lap()`` returns seconds since the previous ``lap()``/``start()``."""

    clock: Clock = time.perf_counter
    sync: Callable[[], None] = _no_sync

    def now(self) -> float:
        self.sync()
        return self.clock()

    def start(self) -> float:
        self._last = self.now()
        return self._last

    def lap(self) -> float:
        t = self.now()
        elapsed, self._last = t - self._last, t
        return elapsed


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default): ``q`` in [0, 100]."""
    if not samples:
        return math.nan
    values = sorted(samples)
    pos = (len(values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


@dataclass
class TimingStats:
    """Summary of repeated measurements, in seconds."""

    median: float
    p90: float
    mean: float
    min: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> "TimingStats":
        if not samples:
            return cls(math.nan, math.nan, math.nan, math.nan, 0)
        return cls(percentile(samples, 50), percentile(samples, 90), sum(samples) / len(samples),
                   min(samples), len(samples))


@dataclass
class PrefillTiming:
    """Per-repeat prefill forward time and time to first token (forward + picking the token), seconds."""

    prefill: list[float]
    ttft: list[float]


def time_prefill(run_forward: Callable[[], object], pick_token: Callable[[object], object], *, warmup: int,
                 repeats: int, watch: Stopwatch) -> tuple[PrefillTiming, object]:
    """Run ``warmup`` untimed then ``repeats`` timed prefills; returns the timings and the last token picked.

    Each repeat reads the clock three times: before the forward, after it (synced), after the first token.
    """
    for _ in range(warmup):
        pick_token(run_forward())
    prefill, ttft, token = [], [], None
    for _ in range(repeats):
        watch.start()
        out = run_forward()
        forward = watch.lap()
        token = pick_token(out)
        prefill.append(forward)
        ttft.append(forward + watch.lap())
    return PrefillTiming(prefill, ttft), token


def time_decode(step: Callable[[], None], n_tokens: int, *, watch: Stopwatch) -> list[float]:
    """Time ``n_tokens`` calls of ``step`` (one decode step each, cache growing); seconds per step."""
    watch.start()
    laps = []
    for _ in range(n_tokens):
        step()
        laps.append(watch.lap())
    return laps


def decode_rate(step_times: Sequence[float], batch: int) -> tuple[float, float]:
    """(median seconds per decode step, generated tokens per second over all steps and batch rows)."""
    if not step_times:
        return math.nan, math.nan
    total = sum(step_times)
    return percentile(step_times, 50), (batch * len(step_times) / total if total > 0 else math.inf)
