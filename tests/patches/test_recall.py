"""Attention recall: exact at full budget, low for a selection that drops what the queries attend, follows
eviction (keys gone from the cache still count), and reaches the report and the eval column."""
from __future__ import annotations

import pytest
import torch

from seqtool.patches import apply_patch, make_cache
from seqtool.patches.recall import RecallMeter, recall_per_query

from .helpers import tiny


def test_recall_per_query_counts_the_dropped_mass():
    torch.manual_seed(0)
    q = torch.randn(1, 2, 4, 8) * 0.1
    k = torch.randn(1, 1, 40, 8) * 0.1
    k[0, 0, 5, 0] = 20.0
    q[0, :, :, 0] = 1.0  # every query attends key 5 almost only
    full = torch.ones(1, 2, 4, 40, dtype=torch.bool)
    assert (recall_per_query(q, k, full, 1.0) == 1.0).all()
    without = full.clone()
    without[..., 5] = False
    assert (recall_per_query(q, k, without, 1.0) < 0.05).all()
    only = torch.zeros_like(full)
    only[..., 5] = True
    assert (recall_per_query(q, k, only, 1.0) > 0.95).all()


def _decode_with_meter(model, handle, ids, prompt):
    with RecallMeter(handle) as meter, torch.no_grad():
        cache = make_cache(model)
        model(ids[:, :prompt], cache=cache, use_cache=True)
        meter.phase = "answer"
        for t in range(prompt, ids.shape[1]):
            model(ids[:, t : t + 1], cache=cache, use_cache=True)
    return meter


@pytest.mark.parametrize("method,opts", [("block_topk", dict(block=16, page=8)), ("snapkv", dict(window=8))])
def test_full_budget_recall_is_exactly_one(method, opts):
    model = tiny()
    ids = torch.randint(3, 250, (2, 100))
    handle = apply_patch(model, method, budget="full", min_len=0, **opts)
    meter = _decode_with_meter(model, handle, ids, 92)
    handle.remove()
    assert (meter.per_head("prefill") == 1.0).all() and (meter.per_head("answer") == 1.0).all()
    assert meter.skipped == 0


def test_evicted_keys_count_as_lost():
    """Streaming evicts outside its window: decode recall is measured against every key seen (not the kept
    cache, where it would be 1.0), and a tiny window keeps much less than a large one."""
    model = tiny()
    ids = torch.randint(3, 250, (1, 140))
    got = {}
    for budget in (16, 96):
        handle = apply_patch(model, "streaming", budget=budget, block=16, min_len=0)
        meter = _decode_with_meter(model, handle, ids, 130)
        handle.remove()
        assert meter.skipped == 0
        got[budget] = meter.mean("answer")
    assert got[16] < 0.9 and got[16] < got[96] < 1.0, got


def test_report_has_answer_recall():
    from seqtool.patches.report import patch_report
    from seqtool.zoo.byte_tokenizer import byte_level_tokenizer

    model = tiny("tiny-llama")
    rep = patch_report(model, "block_topk", dict(budget=0.25, block=16, min_len=0), probe_tokens=200,
                       tokenizer=byte_level_tokenizer())
    assert rep.probe == "passkey" and rep.answer is not None
    assert 0 < rep.recall_answer < 1 and 0 < rep.mass_kept < 1
    assert all(0 <= h.recall_answer <= 1 for h in rep.heads)


def test_eval_recall_column():
    import seqtool

    res = seqtool.evaluate("tiny-llama", "passkey", seq_lens=(256,), samples=1, depths=[0.5], batch=1,
                           attn="block_topk:budget=0.25,block=16,min_len=0", recall=True, dtype="float32",
                           device="cpu")
    (row,) = res.recall
    assert row.task == "passkey" and row.seq_len == 256
    assert 0 < row.answer < 1 and 0 < row.all < 1 and len(row.per_head_answer) == 2
