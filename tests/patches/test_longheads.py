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


def test_packed_shift_by_hand():
    from seqtool.patches.longheads import packed_shift

    index = torch.tensor([[[[0, 3, 7, 8, 0], [0, 1, 2, 0, 0]]]], dtype=torch.int32)  # (1, 1, 2, 5)
    count = torch.tensor([[[4, 3]]], dtype=torch.int32)
    # row 0: chunks 0,3,7,8 pack to 5,6,7,8; row 1 is already contiguous
    assert packed_shift(index, count, 16).tolist() == [[[[80, 48, 0, 0, 0], [0, 0, 0, 0, 0]]]]


def test_reencoding_keeps_distances_within_the_kept_span():
    model = tiny("tiny-llama")
    ids = torch.randint(3, 250, (1, 256))
    handle = apply_patch(model, "longheads", budget=64, min_len=0, block_size=16)
    with handle.recording() as records, torch.no_grad():
        out = model(ids).logits
    handle.remove()
    sel = records[0][0].selection
    shift, mask = sel.key_shift(), sel.mask()
    assert int(shift.abs().max()) > 0
    qpos = torch.arange(256)[:, None]
    distance = (qpos - (torch.arange(256)[None, :] + shift))[mask]
    assert int(distance.min()) >= 0 and int(distance.max()) < 64 + 16  # 64 tokens rounded up to whole chunks
    apply_patch(model, "longheads", budget=64, min_len=0, block_size=16, reencode=False)
    with torch.no_grad():
        plain = model(ids).logits
    assert (out - plain).abs().max() > 1e-3  # the re-encoding changes the result (matrix tests check it is right)


def test_reencode_needs_rope():
    import pytest

    from seqtool.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="reencode=false"):
        LongHeadsMethod(budget=0.5).prepare(torch.nn.Linear(2, 2))
    LongHeadsMethod(budget=0.5, reencode=False).prepare(torch.nn.Linear(2, 2))


def _rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Plain rotate-half RoPE of ``x`` (..., T, D) at positions ``pos`` (T,)."""
    ang = pos.double()[:, None] * inv_freq.double()[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1).float(), torch.cat([ang.sin()] * 2, -1).float()
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def test_decode_scores_chunks_as_the_official_code():
    """Official LongHeads frame (issue 17): chunk keys from keys at chunk-local positions, scored with the query
    before RoPE. Brute force per head on a decode step; the old absolute-position scoring picks other chunks."""
    from types import SimpleNamespace

    torch.manual_seed(3)
    h, d, u, t = 6, 8, 4, 40
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    q_pre, k_pre, v = torch.randn(1, h, t, d), torch.randn(1, h, t, d), torch.randn(1, h, t, d)
    q, k = _rope(q_pre, torch.arange(t), inv_freq), _rope(k_pre, torch.arange(t), inv_freq)
    rotary = torch.nn.Module()
    rotary.register_buffer("inv_freq", inv_freq)
    scale = d ** -0.5
    chosen = {}
    for score in ("chunk", "absolute"):
        method = LongHeadsMethod(budget=4 * u, min_len=0, block_size=u, score=score)
        method.prepare(rotary)
        cache = SimpleNamespace(state={})
        method.select(AttnCall(q[:, :, : t - 1], k[:, :, : t - 1], v[:, :, : t - 1], scale, 0, torch.arange(1), 0,
                               cache))
        sel = method.select_decode(AttnCall(q[:, :, t - 1:], k, v, scale, 0, torch.arange(1), 0, cache))
        chosen[score] = [set(sel.block_mask()[0, i, 0].nonzero().flatten().tolist()) for i in range(h)]
    local = torch.arange(u)
    expected = []
    for i in range(h):
        keys = []
        for c in range(t // u):
            kl, ql = _rope(k_pre[0, i, c * u:(c + 1) * u], local, inv_freq), _rope(q_pre[0, i, c * u:(c + 1) * u],
                                                                                   local, inv_freq)
            summary = (torch.softmax(ql @ kl.T * scale, -1) @ v[0, i, c * u:(c + 1) * u]).mean(0)
            keys.append(torch.softmax(kl @ summary * scale, -1) @ kl)
        scores = torch.stack(keys)[1: t // u - 2] @ q_pre[0, i, -1]  # middle chunks 1..7
        expected.append({0, int(scores.argmax()) + 1, t // u - 2, t // u - 1})
    assert chosen["chunk"] == expected
    assert chosen["absolute"] != expected


def test_score_option_is_checked():
    import pytest

    from seqtool.errors import BadInputError

    with pytest.raises(BadInputError, match="chunk or absolute"):
        LongHeadsMethod(budget=0.5, score="relative")
