"""LongHeads: chunk keys, per-head selection, the trained-length cap, work scales, every preset."""
from __future__ import annotations

import torch

from seqtool.patches import apply_patch
from seqtool.patches.base import AttnCall
from seqtool.patches.longheads import LongHeadsMethod, chunk_keys

from .helpers import tiny
from .test_hip import check_flops_scale, check_no_square, check_presets_masked


def test_chunk_keys_brute_force():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 2, 2, 4, 8), torch.randn(1, 1, 2, 4, 8), torch.randn(1, 1, 2, 4, 8)
    got = chunk_keys(q, k, v, 0.3)
    for c in range(2):
        outs = [torch.softmax(q[0, 0, g, c] @ k[0, 0, c].T * 0.3, -1) @ v[0, 0, c] for g in range(2)]
        summary = torch.cat(outs).mean(0)
        w = torch.softmax(k[0, 0, c] @ summary * 0.3, -1)
        torch.testing.assert_close(got[0, 0, c], w @ k[0, 0, c])


def test_heads_choose_differently_and_cap_holds():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 320, 16), torch.randn(1, 2, 320, 16)
    call = AttnCall(q, k, k, 0.25, 0, torch.arange(1), 0)
    sel = LongHeadsMethod(budget=0.5, block_size=16).select(call)
    last = sel.block_mask()[0, :, -1]  # (Hq, nk)
    assert not torch.equal(last[0], last[1])  # query heads of one KV group pick their own chunks
    assert last[:, 0].all() and last[:, -1].all() and last[:, -2].all()  # first + local chunks
    capped = LongHeadsMethod(budget=0.5, block_size=16, trained_len=64).select(call)
    per_query = capped.mask().sum(-1)
    assert int(per_query.max()) <= 64 and int(sel.mask().sum(-1).max()) > 64


def test_flops_scale_with_budget():
    check_flops_scale("longheads", block_size=16)


def test_no_square_tensor_on_sparse_path():
    model = tiny("tiny-qwen2")
    apply_patch(model, "longheads", budget=0.25, min_len=0, block_size=16)
    check_no_square(model, torch.randint(3, 250, (1, 200)))


def test_every_preset_matches_masked_reference():
    check_presets_masked("longheads", block_size=16)
