"""Chunked gated linear attention in PyTorch, differentiable by autograd.

Per chunk of C tokens with in-chunk cumulative log-decays b_i = g_1 + ... + g_i (<= 0, non-increasing):

    out_i   = scale * [ (q_i * e^{b_i}) S + sum_{j <= i} A_ij v_j ],   A_ij = sum_d q_id k_jd e^{b_id - b_jd}
    S_next  = e^{b_C} * S + sum_j (k_j * e^{b_C - b_j})^T v_j

Every exponent is <= 0, so nothing overflows however strong the decay. With one decay per head (Mamba2,
Lightning) A = (Q K^T) * exp(b_i - b_j). With a decay per key dimension (GLA) A is built from sub-chunks of
<= 8 tokens: diagonal sub-blocks exactly through a (c, c, Dk) factor, the keys before a sub-chunk with the decay
split at its start (q_i e^{b_i - r}, k_j e^{r - b_j}, both exponents <= 0) and one matmul. All chunks are batched; only
the state recurrence loops, once per chunk. Memory is linear in T (never T x T).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import cdiv


def _sub_size(C: int) -> int:
    return max(d for d in range(1, min(8, C) + 1) if C % d == 0)


class _DiagBlocks(torch.autograd.Function):
    """A_ij = sum_d q_id k_jd exp(b_id - b_jd) for j <= i inside each sub-chunk (..., c, Dk) -> (..., c, c).

    A hand-written backward: autograd through the (c, c, Dk) broadcasts costs about three times as many
    passes over that tensor as the four needed here."""

    @staticmethod
    def forward(ctx, q, k, b):
        c = q.shape[-2]
        tri = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
        e = (b[..., :, None, :] - b[..., None, :, :]).masked_fill_(~tri[..., None], float("-inf")).exp_()
        ctx.save_for_backward(q, k, e)
        return (q[..., :, None, :] * e).mul_(k[..., None, :, :]).sum(-1)

    @staticmethod
    def backward(ctx, dA):
        q, k, e = ctx.saved_tensors
        f = dA[..., None] * e  # (..., c, c, Dk)
        fk = f * k[..., None, :, :]
        dq = fk.sum(-2)
        m = fk.mul_(q[..., :, None, :])  # dA_ij q_id k_jd e_ijd
        db = m.sum(-2) - m.sum(-3)
        dk = (f.mul_(q[..., :, None, :])).sum(-3)
        return dq, dk, db


def _intra_per_dim(qf, kf, b, C):
    """A (B, H, N, C, C) for per-dimension decays b (B, H, N, C, Dk)."""
    B, H, N, _, Dk = qf.shape
    c = _sub_size(C)
    ns = C // c
    qs, ks, bs = (x.view(B, H, N, ns, c, Dk) for x in (qf, kf, b))
    diag = _DiagBlocks.apply(qs, ks, bs)  # (B, H, N, ns, c, c)
    rows = [F.pad(diag[:, :, :, 0], (0, C - c))]
    for i in range(1, ns):  # rows of sub-chunk i against the keys before it, split at the boundary s
        s = i * c
        r = b[:, :, :, s - 1, None, :]  # (B, H, N, 1, Dk): b just before sub-chunk i; b_q <= r <= b_k
        qt = qf[:, :, :, s:s + c] * torch.exp(b[:, :, :, s:s + c] - r)
        kt = kf[:, :, :, :s] * torch.exp(r - b[:, :, :, :s])
        rows.append(torch.cat([qt @ kt.transpose(-1, -2), diag[:, :, :, i], qf.new_zeros(B, H, N, c, C - s - c)], -1))
    return torch.cat(rows, -2)


def _gated_linear_attn_torch_segment(q, k, v, log_decay, *, chunk=64, scale=1.0, initial_state=None):
    """Same math as reference.gated_linear_attn_reference. Returns (out (B, H, T, Dv) in q.dtype, state fp32)."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    C = min(chunk, max(T, 1))
    N = max(cdiv(T, C), 1)
    pad = N * C - T
    per_dim = log_decay.dim() == 4
    qf = F.pad(q.float(), (0, 0, 0, pad)).view(B, H, N, C, Dk)
    kf = F.pad(k.float(), (0, 0, 0, pad)).view(B, H, N, C, Dk)
    vf = F.pad(v.float(), (0, 0, 0, pad)).view(B, H, N, C, Dv)
    if per_dim:
        b = F.pad(log_decay.float(), (0, 0, 0, pad)).view(B, H, N, C, Dk).cumsum(3)
        blast = b[:, :, :, -1:]  # (B, H, N, 1, Dk)
        A = _intra_per_dim(qf, kf, b, C)
        qg, kg = qf * torch.exp(b), kf * torch.exp(blast - b)
        chunk_decay = torch.exp(blast).transpose(-1, -2)  # (B, H, N, Dk, 1)
    else:
        b = F.pad(log_decay.float(), (0, pad)).view(B, H, N, C).cumsum(3)
        blast = b[..., -1:]
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        A = (qf @ kf.transpose(-1, -2)) * torch.exp((b[..., :, None] - b[..., None, :]).masked_fill(~causal,
                                                                                                      float("-inf")))
        qg, kg = qf * torch.exp(b)[..., None], kf * torch.exp(blast - b)[..., None]
        chunk_decay = torch.exp(blast)[..., None]  # (B, H, N, 1, 1)
    dS = kg.transpose(-1, -2) @ vf  # (B, H, N, Dk, Dv)
    S = q.new_zeros(B, H, Dk, Dv, dtype=torch.float32) if initial_state is None else initial_state.float()
    states = []
    for n in range(N):
        states.append(S)
        S = torch.addcmul(dS[:, :, n], S, chunk_decay[:, :, n])
    before = torch.stack(states, 2)
    out = (A @ vf + qg @ before) * scale
    return out.reshape(B, H, N * C, Dv)[:, :, :T].to(q.dtype), S


def gated_linear_attn_torch(q, k, v, log_decay, *, chunk=64, scale=1.0, initial_state=None, segment=None):
    """Same math as reference.gated_linear_attn_reference. Returns (out (B, H, T, Dv) in q.dtype, state fp32).

    Runs segments of ~``segment`` tokens (default 512, 256 with per-dimension decays) one after the other,
    carrying the state, so every intermediate has a fixed, cache-friendly size and the time per token does not
    grow with T (large fresh buffers page-fault on CPU).
    """
    T = q.shape[2]
    if segment is None:
        segment = 256 if log_decay.dim() == 4 else 512
    seg = max(chunk, segment // chunk * chunk)
    if T <= seg:
        return _gated_linear_attn_torch_segment(q, k, v, log_decay, chunk=chunk, scale=scale,
                                                initial_state=initial_state)
    outs, state = [], initial_state
    for t0 in range(0, T, seg):
        sl = slice(t0, t0 + seg)
        o, state = _gated_linear_attn_torch_segment(q[:, :, sl], k[:, :, sl], v[:, :, sl], log_decay[:, :, sl],
                                                    chunk=chunk, scale=scale, initial_state=state)
        outs.append(o)
    return torch.cat(outs, 2), state
