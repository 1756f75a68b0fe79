"""Triton block-sparse flash-attention forward (one program per (query block, batch*head))."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import cdiv
from .._triton_tiles import online_softmax_tile
from .._triton_utils import check_block, dot_fp32, pow2_at_least

_LOG2E = 1.4426950408889634


@triton.jit
def _bsa_fwd(Q, K, V, BI, BC, CI, CC, KVS, O, LSE,
             sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
             Hq, G, Tq, Tk, NQ, MAXK, MAXC, qk_scale,
             D: tl.constexpr, HAS_COLS: tl.constexpr, HAS_KVS: tl.constexpr, DOT_FP32: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // G
    offs_m = j * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                mask=(offs_m[:, None] < Tq) & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    qpos = Tk - Tq + offs_m
    kvs = 0
    if HAS_KVS:
        kvs = tl.load(KVS + b)
    kbase = K + b * skb + hk * skh
    vbase = V + b * svb + hk * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row = (b * Hq + h) * NQ + j
    cnt = tl.minimum(tl.load(BC + row), MAXK)
    for s in range(0, cnt):
        blk = tl.load(BI + row * MAXK + s)
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = (offs_n < Tk) & (offs_n >= 0)
        k = tl.load(kbase + offs_n[:, None] * skt + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(vbase + offs_n[:, None] * svt + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        ok = (offs_n[None, :] <= qpos[:, None]) & n_ok[None, :] & (offs_n[None, :] >= kvs)
        m_i, l_i, acc = online_softmax_tile(q, k, v, ok, qk_scale, m_i, l_i, acc, DOT_FP32)
    if HAS_COLS:
        ccnt = tl.minimum(tl.load(CC + row), MAXC)
        for c0 in range(0, ccnt, BLOCK_N):
            offs_c = c0 + tl.arange(0, BLOCK_N)
            c_ok = offs_c < ccnt
            cols = tl.load(CI + row * MAXC + offs_c, mask=c_ok, other=0)
            c_ok = c_ok & (cols < Tk) & (cols >= kvs) & (cols >= 0)
            k = tl.load(kbase + cols[:, None] * skt + offs_d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(vbase + cols[:, None] * svt + offs_d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
            ok = (cols[None, :] <= qpos[:, None]) & c_ok[None, :]
            m_i, l_i, acc = online_softmax_tile(q, k, v, ok, qk_scale, m_i, l_i, acc, DOT_FP32)
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    m_ok = offs_m < Tq
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh * Tq + offs_m, lse, mask=m_ok)


def block_sparse_attn_triton(q, k, v, block_index, block_count, *, block_q, block_k, scale, kv_start=None,
                             column_index=None, column_count=None):
    """Launch the Triton kernel (CUDA tensors, or CPU under TRITON_INTERPRET=1). Returns (out, lse fp32)."""
    op = "block_sparse_attn"
    check_block(block_q, "block_q", op)
    check_block(block_k, "block_k", op)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, Tq, device=q.device, dtype=torch.float32)
    nq = cdiv(Tq, block_q)
    has_cols = column_index is not None
    ci = column_index if has_cols else block_index
    cc = column_count if has_cols else block_count
    kvs = kv_start if kv_start is not None else block_count
    block_d = pow2_at_least(D)
    grid = (nq, B * Hq)
    if B * Hq and nq:
        _bsa_fwd[grid](
            q, k, v, block_index, block_count, ci, cc, kvs, out, lse,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            Hq, Hq // Hkv, Tq, Tk, nq, block_index.shape[-1], ci.shape[-1], scale * _LOG2E,
            D=D, HAS_COLS=has_cols, HAS_KVS=kv_start is not None, DOT_FP32=dot_fp32(),
            BLOCK_M=block_q, BLOCK_N=block_k, BLOCK_D=block_d,
            num_warps=4 if block_q * block_d <= 64 * 64 else 8, num_stages=2,
        )
    return out, lse
