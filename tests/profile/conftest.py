"""Shared fixtures for profile tests: tiny models built once, a scripted clock."""
from __future__ import annotations

import pytest

from seqtool.zoo.presets import TINY_PRESETS, build_preset


class StepClock:
    """A clock that advances by ``step`` seconds every time it is read."""

    def __init__(self, step: float = 0.25):
        self.step, self.t, self.reads = step, 0.0, 0

    def __call__(self) -> float:
        self.t += self.step
        self.reads += 1
        return self.t


@pytest.fixture(scope="session")
def tiny_models():
    return {name: build_preset(name)[0] for name in TINY_PRESETS}


@pytest.fixture
def step_clock():
    return StepClock()
