"""block_sparse_attn / vertical_slash_attn: torch path and Triton (interpreter) against the reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqtool.kernels import block_sparse_attn, vertical_slash_attn, vertical_slash_index
from seqtool.kernels._common import HAS_TRITON
from seqtool.kernels.block_sparse.reference import masked_attention_reference, vertical_slash_mask
from seqtool.kernels.testing import assert_close, random_block_pattern

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _inputs(B, Hq, Hkv, Tq, Tk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, t, D, generator=g).to(dtype) for h, t in ((Hq, Tq), (Hkv, Tk), (Hkv, Tk))]


def _check(q, k, v, bi, bc, bq, bk, backend, kv_start=None):
    out, lse = block_sparse_attn(q, k, v, bi, bc, block_q=bq, block_k=bk, kv_start=kv_start, return_lse=True,
                                 backend=backend)
    ref_o, ref_l = block_sparse_attn(q, k, v, bi, bc, block_q=bq, block_k=bk, kv_start=kv_start, return_lse=True,
                                     backend="reference")
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_close("out", ref_o, out, TOL[q.dtype])
    assert_close("lse", ref_l, lse, 1e-5)


# (B, Hq, Hkv, Tq, Tk, D, block_q, block_k, dtype, keep, kv_start)
CPU_CASES = [
    (2, 4, 2, 63, 63, 64, 16, 16, torch.float32, 0.5, None),
    (1, 4, 1, 100, 257, 60, 32, 16, torch.bfloat16, 0.3, None),
    (2, 2, 2, 257, 257, 128, 64, 64, torch.float16, 0.6, (5, 0)),
    (2, 8, 2, 40, 300, 64, 16, 64, torch.float32, 1.0, (0, 77)),
    (1, 4, 4, 513, 513, 96, 64, 32, torch.bfloat16, 0.2, None),
]


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"T{c[3]}x{c[4]}-D{c[5]}-g{c[1] // c[2]}-{c[8]}")
def test_torch_path_matches_reference(case):
    B, Hq, Hkv, Tq, Tk, D, bq, bk, dtype, keep, kvs = case
    q, k, v = _inputs(B, Hq, Hkv, Tq, Tk, D, dtype)
    bi, bc = random_block_pattern(B, Hq, Tq, Tk, block_q=bq, block_k=bk, keep=keep,
                                  generator=torch.Generator().manual_seed(1))
    bc[0, 0, 0] = 0  # one empty row: out 0, lse -inf
    _check(q, k, v, bi, bc, bq, bk, "torch", None if kvs is None else torch.tensor(kvs))


TRITON_CASES = [
    (2, 4, 2, 63, 63, 64, 32, 32, torch.float32, 0.5, (3, 0)),
    (1, 4, 1, 100, 257, 60, 64, 32, torch.float16, 0.4, None),
    (1, 2, 2, 257, 257, 128, 64, 64, torch.float16, 1.0, None),
]


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"T{c[3]}x{c[4]}-D{c[5]}-g{c[1] // c[2]}-{c[8]}")
def test_triton_matches_reference(case):
    B, Hq, Hkv, Tq, Tk, D, bq, bk, dtype, keep, kvs = case
    q, k, v = _inputs(B, Hq, Hkv, Tq, Tk, D, dtype)
    bi, bc = random_block_pattern(B, Hq, Tq, Tk, block_q=bq, block_k=bk, keep=keep,
                                  generator=torch.Generator().manual_seed(2))
    bc[0, -1, 0] = 0
    _check(q, k, v, bi, bc, bq, bk, "triton", None if kvs is None else torch.tensor(kvs))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_full_block_lists_equal_dense_causal_sdpa(backend):
    B, Hq, Hkv, T, D = 1, 4, 2, 200, 64
    q, k, v = _inputs(B, Hq, Hkv, T, T, D, torch.float32, seed=3)
    nq = -(-T // 64)
    bi = torch.arange(nq, dtype=torch.int32).expand(B, Hq, nq, nq).contiguous()
    bc = (torch.arange(nq, dtype=torch.int32) + 1).expand(B, Hq, nq).contiguous()
    out = block_sparse_attn(q, k, v, bi, bc, backend=backend)
    dense = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    assert_close("full budget vs sdpa", dense, out, 1e-5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_empty_block_lists_give_zero_and_neg_inf(backend):
    q, k, v = _inputs(1, 2, 1, 64, 64, 64, torch.float32)
    bi = torch.zeros(1, 2, 1, 1, dtype=torch.int32)
    bc = torch.zeros(1, 2, 1, dtype=torch.int32)
    out, lse = block_sparse_attn(q, k, v, bi, bc, return_lse=True, backend=backend)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


def test_unsorted_block_ids_and_ignored_tail_entries():
    q, k, v = _inputs(1, 2, 2, 128, 128, 32, torch.float32)
    bi = torch.tensor([[0, 99, 99], [1, 0, 99]], dtype=torch.int32).expand(1, 2, 2, 3).contiguous()
    bc = torch.tensor([1, 2], dtype=torch.int32).expand(1, 2, 2).contiguous()
    _check(q, k, v, bi, bc, 64, 64, "torch")


VS_CASES = [("torch", torch.bfloat16, 16, 32), ("triton", torch.float32, 32, 32)]


@pytest.mark.parametrize("backend,dtype,bq,bk", VS_CASES)
def test_vertical_slash_matches_definition(backend, dtype, bq, bk):
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton not installed")
    B, Hq, Hkv, Tq, Tk, D = 2, 4, 2, 150, 190, 64
    q, k, v = _inputs(B, Hq, Hkv, Tq, Tk, D, dtype, seed=4)
    g = torch.Generator().manual_seed(5)
    vi = torch.randint(0, Tk, (B, Hq, 9), generator=g)
    vi[0, 0, :3] = 7  # duplicates are counted once
    si = torch.randint(0, Tk, (B, Hq, 4), generator=g)
    si[..., 0] = 0  # the main diagonal
    kvs = torch.tensor([0, 11])
    out, lse = vertical_slash_attn(q, k, v, vi, si, block_q=bq, block_k=bk, kv_start=kvs, return_lse=True,
                                   backend=backend)
    mask = vertical_slash_mask(Tq, Tk, vi, si, block_q=bq, block_k=bk, kv_start=kvs)
    ref_o, ref_l = masked_attention_reference(q, k, v, mask, D ** -0.5)
    assert_close("out", ref_o, out, TOL[dtype])
    assert_close("lse", ref_l, lse, 1e-5)


def test_vertical_slash_index_columns_avoid_blocks():
    vi = torch.tensor([[[0, 5, 70, 200]]])
    si = torch.tensor([[[0, 100]]])
    bi, bc, ci, cc = vertical_slash_index(vi, si, 128, 256, block_q=64, block_k=64)
    for j in range(2):
        blocks = set(bi[0, 0, j, : bc[0, 0, j]].tolist())
        cols = ci[0, 0, j, : cc[0, 0, j]].tolist()
        assert all(c // 64 not in blocks for c in cols)
        assert cols == sorted(cols)
    # query block 0 holds positions 128..191: diagonal blocks 2 (and 3 is beyond it), slash 100 -> keys 28..91
    assert set(bi[0, 0, 0, : bc[0, 0, 0]].tolist()) == {0, 1, 2}
    assert ci[0, 0, 0, : cc[0, 0, 0]].tolist() == []
    # query block 1 (192..255): diagonal -> block 3, slash 100 -> keys 92..155 -> blocks 1, 2
    assert set(bi[0, 0, 1, : bc[0, 0, 1]].tolist()) == {1, 2, 3}
    assert ci[0, 0, 1, : cc[0, 0, 1]].tolist() == [0, 5]


@pytest.mark.parametrize("case", CPU_CASES[:4], ids=lambda c: f"T{c[3]}x{c[4]}-D{c[5]}-{c[8]}")
def test_rope_block_shift_matches_reference(case):
    """Per-(query block, key block) RoPE re-encoding (LongHeads) equals dense attention over re-rotated keys."""
    B, Hq, Hkv, Tq, Tk, D, bq, bk, dtype, keep, kvs = case
    q, k, v = _inputs(B, Hq, Hkv, Tq, Tk, D, dtype)
    bi, bc = random_block_pattern(B, Hq, Tq, Tk, block_q=bq, block_k=bk, keep=keep,
                                  generator=torch.Generator().manual_seed(1))
    shift = torch.randint(-300, 300, bi.shape, generator=torch.Generator().manual_seed(2))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D - 8, 2).float() / D))  # partial rotary: last 8 dims untouched
    kw = dict(block_q=bq, block_k=bk, kv_start=None if kvs is None else torch.tensor(kvs), return_lse=True,
              block_shift=shift, rope_inv_freq=inv_freq)
    out, lse = block_sparse_attn(q, k, v, bi, bc, backend="torch", **kw)
    ref_o, ref_l = block_sparse_attn(q, k, v, bi, bc, backend="reference", **kw)
    plain = block_sparse_attn(q, k, v, bi, bc, block_q=bq, block_k=bk, backend="torch")
    assert_close("out", ref_o, out, TOL[q.dtype])
    assert_close("lse", ref_l, lse, 1e-4)
    assert (out.float() - plain.float()).abs().max() > 10 * TOL[q.dtype]  # the shift really changed the result
    zero = block_sparse_attn(q, k, v, bi, bc, block_q=bq, block_k=bk, backend="torch",
                             block_shift=torch.zeros_like(shift), rope_inv_freq=inv_freq)
    torch.testing.assert_close(zero, plain, atol=0, rtol=0)


def test_rope_rotate_composes_with_positions():
    """Rotating a RoPE-encoded vector by s equals encoding it at position + s (transformers' own RoPE)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from seqtool.kernels._common import rope_rotate

    D, T = 16, 7
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).double() / D))
    x = torch.randn(1, 1, T, D, dtype=torch.float64)

    def encode(pos):
        freqs = pos[:, None].double() * inv_freq
        emb = torch.cat([freqs, freqs], -1)
        return apply_rotary_pos_emb(x, x, emb.cos()[None], emb.sin()[None])[0]

    pos = torch.arange(T)
    shift = torch.tensor([0, 5, -3, 100, 7, 1, 4000])
    torch.testing.assert_close(rope_rotate(encode(pos), shift, inv_freq), encode(pos + shift))
