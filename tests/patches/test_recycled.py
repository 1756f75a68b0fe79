"""Recycled Attention's refresh schedule: fixed stride, and the paper's query-similarity (dynamic) rule."""
from __future__ import annotations

import torch

from seqtool.patches.base import AttnCall
from seqtool.patches.cache import SeqtoolCacheLayer
from seqtool.patches.recycled import Recycled, _FullStep
from seqtool.patches.selection import TokenSelection


def _steps(method: Recycled, queries: list[torch.Tensor], tk: int = 64):
    """Prefill ``tk`` keys then one decode step per query (b, Hq, 1, D); the selection type of each step."""
    torch.manual_seed(0)
    cache = SeqtoolCacheLayer(None)
    k = torch.randn(1, 2, tk + len(queries), 8)
    q0 = torch.randn(1, 2, tk, 8)
    sel = method.select(AttnCall(q0, k[:, :, :tk], k[:, :, :tk], 0.35, 0, torch.arange(1), 0, cache))
    sel.attend(q0, k[:, :, :tk], k[:, :, :tk], 0.35)
    kinds = []
    for i, q in enumerate(queries):
        n = tk + i + 1
        call = AttnCall(q, k[:, :, :n], k[:, :, :n], 0.35, 0, torch.arange(1), 0, cache)
        sel = method.select_decode(call)
        sel.attend(q, k[:, :, :n], k[:, :, :n], 0.35)
        kinds.append("full" if isinstance(sel, _FullStep) else "recycled" if isinstance(sel, TokenSelection) else "?")
    return kinds


def test_fixed_stride_schedule():
    q = torch.randn(1, 2, 1, 8)
    assert _steps(Recycled(budget=0.25, stride=3, sim=-1.0), [q] * 7) == \
        ["recycled", "recycled", "full", "recycled", "recycled", "full", "recycled"]


def test_query_drift_forces_a_full_step():
    """A step whose query turned away from the last full step's query attends everything again (the question
    tokens after a filler-text prefill: recycling the filler's top-K lost every passkey on ref)."""
    base = torch.zeros(1, 2, 1, 8)
    base[..., 0] = 1.0
    close = base + 0.05
    other = torch.zeros(1, 2, 1, 8)
    other[..., 1] = 1.0
    method = Recycled(budget=0.25, stride=100, sim=0.5)
    # The prefill's last query is random: the first step drifts from it and refreshes; then similar queries recycle.
    kinds = _steps(method, [base, close, close, other, other, base])
    assert kinds == ["full", "recycled", "recycled", "full", "recycled", "full"]
