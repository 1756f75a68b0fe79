"""GQA: how each method combines the query heads of a group when it picks keys for their shared KV head.

A planted call (1 KV head, 2 query heads, 128 keys in 8 units of 16): every key of unit A (2), B (4) and C (6)
equals one direction, the rest are zero. Query head 0 points at A (5) and B (4.5), head 1 at B (4.5) and C (5.2),
and the budget leaves room for one middle unit. Each head alone picks A / C; the *sum* of the group's scores (or
of its softmax masses) picks B; the *max* picks C. So the chosen unit says which combination a method uses
(docs/patches.md, "GQA").
"""
from __future__ import annotations

import torch

from seqtool.patches.base import AttnCall
from seqtool.patches.block_topk import BlockTopK
from seqtool.patches.hip import HipMethod
from seqtool.patches.infllm import InfLLMMethod
from seqtool.patches.longheads import LongHeadsMethod
from seqtool.patches.recycled import Recycled
from seqtool.patches.snapkv import window_scores
from seqtool.patches._evict import attention_mass

U, N, D = 16, 8, 8
A, B, C = 2, 4, 6


def planted(tq: int) -> AttnCall:
    k = torch.zeros(1, 1, U * N, D)
    for unit, axis in ((A, 0), (B, 1), (C, 2)):
        k[0, 0, unit * U:(unit + 1) * U, axis] = 1.0
    q0 = torch.zeros(D)
    q0[0], q0[1] = 5.0, 4.5
    q1 = torch.zeros(D)
    q1[1], q1[2] = 4.5, 5.2
    q = torch.stack([q0, q1])[None, :, None, :].expand(1, 2, tq, D).contiguous()
    return AttnCall(q, k, torch.randn_like(k), 1.0, 0, torch.tensor([0]), 0, None)


def units_of_last_query(selection, head: int) -> set[int]:
    """Middle units (not the first, not the last) attended by the last query of query head ``head``."""
    row = selection.mask()[0, head, -1]
    return {u for u in range(1, N - 1) if bool(row[u * U:(u + 1) * U].any())}


def unit_scores(mass: torch.Tensor) -> list[float]:
    return [float(mass[..., u * U:(u + 1) * U].sum()) for u in range(N)]


def test_the_plant_separates_sum_max_and_per_head():
    call = planted(1)
    per_head = [attention_mass(call.q[:, h:h + 1], call.k, 1.0, 1) for h in (0, 1)]
    assert max(range(N), key=lambda u: unit_scores(per_head[0])[u]) == A
    assert max(range(N), key=lambda u: unit_scores(per_head[1])[u]) == C
    summed = attention_mass(call.q, call.k, 1.0, 2)  # what snapkv / h2o / recycled score
    torch.testing.assert_close(summed, per_head[0] + per_head[1])
    assert max(range(N), key=lambda u: unit_scores(summed)[u]) == B


def test_sum_of_group_scores_infllm_decode():
    sel = InfLLMMethod(budget=3 * U, block_size=U, sink_blocks=1, local_blocks=1).select_decode(planted(1))
    assert units_of_last_query(sel, 0) == units_of_last_query(sel, 1) == {B}


def test_sum_of_group_mass_snapkv_h2o_recycled():
    call = planted(8)
    scores = window_scores(call, window=8, kernel=1)  # (1, Hkv=1, Tk): one kept set for the KV head
    assert scores.shape == (1, 1, U * N)
    assert int(scores[0, 0].argmax()) // U == B
    from seqtool.patches.cache import SeqtoolCacheLayer

    method = Recycled(budget=U)
    call1 = planted(1)
    call1.cache = SeqtoolCacheLayer()
    call1.cache.state[("recycled", 0)] = {"steps": 0}
    method.record_topk(call1)
    index = call1.cache.state[("recycled", 0)]["index"]  # (1, Hkv=1, K)
    assert index.shape == (1, 1, U) and set((index // U).flatten().tolist()) == {B}


def test_mean_of_group_expected_attention():
    from seqtool.patches.expected_attention import expected_scores

    call = planted(8)  # identical queries: zero covariance; zero RoPE frequencies: no rotation
    scores = expected_scores(call, torch.zeros(D // 2), future=4, sinks=0, vnorm=False)
    assert scores.shape == (1, 1, U * N) and int(scores[0, 0].argmax()) // U == B


def test_max_over_group_block_topk_decode_and_hip_decode():
    sel = BlockTopK(budget=3 * U, block=U, page=U).select_decode(planted(1))
    assert units_of_last_query(sel, 0) == units_of_last_query(sel, 1) == {C}
    # HiP's tree judges a branch by its centre key, so its plant has just two middle units X (1) and Y (2):
    # head 0 scores X 5 / Y 4.5, head 1 X 0 / Y 4.5 -- max picks X, a sum (9 for Y) would pick Y
    k = torch.zeros(1, 1, 4 * U, D)
    k[0, 0, U:2 * U, 0] = k[0, 0, 2 * U:3 * U, 1] = 1.0
    q = torch.tensor([[5.0, 4.5] + [0.0] * (D - 2), [0.0, 4.5] + [0.0] * (D - 2)])[None, :, None]
    call = AttnCall(q, k, torch.randn_like(k), 1.0, 0, torch.tensor([0]), 0, None)
    row = HipMethod(budget=3 * U, block_size=U, key_block=U).select_decode(call).mask()[0, :, -1]
    assert row[:, U:2 * U].all() and not row[:, 2 * U:3 * U].any()  # both query heads: X only


def test_per_query_head_prefill_block_topk_and_longheads():
    call = planted(U * N)
    sel = BlockTopK(budget=3 * U, block=U, page=U).select(call)
    assert units_of_last_query(sel, 0) == {A} and units_of_last_query(sel, 1) == {C}
    sel = LongHeadsMethod(budget=3 * U, block_size=U, local_blocks=1, reencode=False).select(call)
    assert units_of_last_query(sel, 0) == {A} and units_of_last_query(sel, 1) == {C}
