"""Triton device functions shared by the attention kernels (imported only where Triton is)."""
import triton
import triton.language as tl


@triton.jit
def online_softmax_tile(q, k, v, ok, qk_scale, m_i, l_i, acc, DOT_FP32: tl.constexpr):
    """One flash-attention step in base 2: scores of q (M, D) against the key tile k (N, D), kept where ok (M, N),
    folded into the running max m_i (M,), denominator l_i (M,) and output accumulator acc (M, D).
    Returns (m_i, l_i, acc)."""
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    sc = tl.dot(q, tl.trans(k)) * qk_scale
    sc = tl.where(ok, sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(sc - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc
