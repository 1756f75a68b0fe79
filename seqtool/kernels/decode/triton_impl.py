"""Triton split-KV decode (flash-decoding): each program owns one KV head, all g*Tq queries of its group and
a contiguous range of pages; a second kernel merges the per-split partials by log-sum-exp."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqtool.errors import ShapeError

from .._common import cdiv
from .._triton_tiles import online_softmax_tile
from .._triton_utils import check_block, dot_fp32, num_sms, pow2_at_least

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_split(Q, K, V, PI, PC, KVS, KVL, OP, LP,
                  sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                  Hkv, G, Tq, Tk, MAXP, NSPLIT, PPS, qk_scale,
                  D: tl.constexpr, HAS_PAGES: tl.constexpr, HAS_KVS: tl.constexpr, HAS_KVL: tl.constexpr,
                  DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    sp = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    hk = bh % Hkv
    offs_m = tl.arange(0, BLOCK_M)  # row m = (query head in group) * Tq + query index
    m_ok = offs_m < G * Tq
    gi = offs_m // Tq
    qi = offs_m % Tq
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + (hk * G + gi)[:, None] * sqh + qi[:, None] * sqt + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    kvl = Tk
    if HAS_KVL:
        kvl = tl.load(KVL + b)
    kvs = 0
    if HAS_KVS:
        kvs = tl.load(KVS + b)
    qpos = kvl - Tq + qi
    if HAS_PAGES:
        npages = tl.minimum(tl.load(PC + bh), MAXP)
    else:
        npages = tl.cdiv(kvl, BLOCK_N)
    p_lo = sp * PPS
    p_hi = tl.minimum(p_lo + PPS, npages)
    kbase = K + b * skb + hk * skh
    vbase = V + b * svb + hk * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for p in range(p_lo, p_hi):
        if HAS_PAGES:
            page = tl.load(PI + bh * MAXP + p)
        else:
            page = p
        offs_n = page * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = (offs_n < kvl) & (offs_n >= kvs)
        k = tl.load(kbase + offs_n[:, None] * skt + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(vbase + offs_n[:, None] * svt + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        ok = n_ok[None, :] & (offs_n[None, :] <= qpos[:, None])
        m_i, l_i, acc = online_softmax_tile(q, k, v, ok, qk_scale, m_i, l_i, acc, DOT_FP32)
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    lse2 = tl.where(seen, m_i + tl.math.log2(l_safe), float("-inf"))  # base-2 log-sum-exp of this split
    base = bh * NSPLIT + sp
    tl.store(OP + (base * BLOCK_M + offs_m[:, None]) * BLOCK_D + offs_d[None, :], acc / l_safe[:, None])
    tl.store(LP + base * BLOCK_M + offs_m, lse2)


@triton.jit
def _decode_merge(OP, LP, O, LSE, sob, soh, sot, Hkv, G, Tq, NSPLIT,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // Hkv
    hk = bh % Hkv
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for sp in range(0, NSPLIT):
        base = bh * NSPLIT + sp
        ls = tl.load(LP + base * BLOCK_M + offs_m)
        os = tl.load(OP + (base * BLOCK_M + offs_m[:, None]) * BLOCK_D + offs_d[None, :])
        m_new = tl.maximum(m_i, ls)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        w = tl.math.exp2(ls - m_safe)
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + os * w[:, None]
        m_i = m_new
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    m_ok = offs_m < G * Tq
    gi = offs_m // Tq
    qi = offs_m % Tq
    h = hk * G + gi
    tl.store(O + b * sob + h[:, None] * soh + qi[:, None] * sot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & (offs_d[None, :] < D))
    tl.store(LSE + (b * Hkv * G + h) * Tq + qi, lse, mask=m_ok)


def decode_attn_triton(q, k, v, *, page_index=None, page_count=None, page_size=64, scale, kv_start=None,
                       kv_len=None, num_splits: int | None = None):
    """Launch split-KV decode (CUDA tensors, or CPU under TRITON_INTERPRET=1). Returns (out, lse fp32)."""
    op = "decode_attn"
    check_block(page_size, "page_size", op)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if G * Tq > 128:
        raise ShapeError(f"{op}: the triton backend handles at most 128 query rows per KV head (got {G * Tq})")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    block_m = pow2_at_least(G * Tq)
    block_d = pow2_at_least(D)
    n_pages = page_index.shape[-1] if page_index is not None else cdiv(Tk, page_size)
    if num_splits is None:
        # Enough programs to fill the GPU twice over, but at least two pages per split.
        num_splits = max(1, min(cdiv(2 * num_sms(q.device), B * Hkv), cdiv(n_pages, 2)))
    pps = max(1, cdiv(n_pages, num_splits))
    num_splits = max(1, cdiv(n_pages, pps))
    part_o = torch.empty(B * Hkv * num_splits * block_m * block_d, device=q.device, dtype=torch.float32)
    part_l = torch.empty(B * Hkv * num_splits * block_m, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, Tq, device=q.device, dtype=torch.float32)
    dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
    _decode_split[(num_splits, B * Hkv)](
        q, k, v, page_index if page_index is not None else dummy, page_count if page_count is not None else dummy,
        kv_start if kv_start is not None else dummy, kv_len if kv_len is not None else dummy, part_o, part_l,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        Hkv, G, Tq, Tk, max(n_pages, 1), num_splits, pps, scale * _LOG2E,
        D=D, HAS_PAGES=page_index is not None, HAS_KVS=kv_start is not None, HAS_KVL=kv_len is not None,
        DOT_FP32=dot_fp32(), BLOCK_M=block_m, BLOCK_N=page_size, BLOCK_D=block_d,
        num_warps=4, num_stages=2,
    )
    _decode_merge[(B * Hkv,)](
        part_o, part_l, out, lse, out.stride(0), out.stride(1), out.stride(2), Hkv, G, Tq, num_splits,
        D=D, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
    )
    return out, lse
