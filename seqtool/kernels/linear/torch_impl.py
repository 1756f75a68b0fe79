"""Chunked causal linear attention in PyTorch (Lightning Attention-2 split), differentiable by autograd.

Per chunk of C tokens: intra = ((Q K^T) * D) V with D_ij = lambda^(i-j) (i >= j), inter = (Q * lambda^(i+1)) S,
where S is the state before the chunk; states advance once per chunk. All chunks are batched; only the
state recurrence loops (once per chunk, one fused op, or a cumsum without decay).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import cdiv


def linear_attn_torch(q, k, v, *, decay=None, chunk_size=64, scale=1.0, initial_state=None):
    """Same math as reference.linear_attn_reference. Returns (out (B, Hq, T, Dv) in q.dtype, final state fp32)."""
    B, Hq, T, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    g = Hq // Hkv
    C = chunk_size
    N = max(cdiv(T, C), 1)
    pad = N * C - T
    dev = q.device
    qf = F.pad(q.float(), (0, 0, 0, pad)).view(B, Hkv, g, N, C, Dk)
    kf = F.pad(k.float(), (0, 0, 0, pad)).view(B, Hkv, 1, N, C, Dk)
    vf = F.pad(v.float(), (0, 0, 0, pad)).view(B, Hkv, 1, N, C, Dv)
    i = torch.arange(C, device=dev, dtype=torch.float32)
    lens = torch.full((N,), float(C), device=dev)
    lens[-1] = float(T - (N - 1) * C)  # the last chunk may be short
    causal = i[:, None] >= i[None, :]
    if decay is None:
        intra_w = causal.float()
        q_w = None
        k_w = None
    else:
        a = torch.log(decay.float()).view(1, Hkv, g, 1, 1, 1)  # log lambda per query head
        diff = (i[:, None] - i[None, :]).clamp(min=0)
        intra_w = torch.exp(a * diff) * causal  # (1, Hkv, g, 1, C, C)
        q_w = torch.exp(a * (i + 1)[:, None])  # (1, Hkv, g, 1, C, 1)
        # exponent clamped at 0 so padded rows (k = 0 there) never overflow
        k_w = torch.exp(a * (lens[:, None] - 1 - i).clamp(min=0)[..., None])  # (1, Hkv, g, N, C, 1)
    # Query heads of a group share k/v: stack them along rows so k/v are read once per group.
    qk = torch.matmul(qf.transpose(2, 3).reshape(B, Hkv, N, g * C, Dk), kf.squeeze(2).transpose(-1, -2))
    w = intra_w if decay is None else intra_w.transpose(2, 3)  # (1, Hkv, 1, g, C, C)
    qk = (qk.view(B, Hkv, N, g, C, C) * w).view(B, Hkv, N, g * C, C)
    out = torch.matmul(qk, vf.squeeze(2)).view(B, Hkv, N, g, C, Dv).transpose(2, 3)
    # Per-chunk state increments (B, Hkv, g|1, N, Dk, Dv) and the recurrence over chunks.
    kw = kf if k_w is None else kf * k_w
    dS = torch.matmul(kw.transpose(-1, -2), vf)
    S0 = None if initial_state is None else initial_state.float().view(B, Hkv, g, 1, Dk, Dv)
    if decay is None:
        before = torch.cumsum(dS, 3) - dS  # exclusive prefix sum = state before each chunk
        if S0 is not None:
            before = before + S0
        final = (before[:, :, :, -1] + dS[:, :, :, -1]).expand(B, Hkv, g, Dk, Dv)
        before = before.expand(B, Hkv, g, N, Dk, Dv)
    else:
        chunk_decay = torch.exp(a.view(1, Hkv, g, 1, 1) * lens.view(N, 1, 1, 1, 1, 1))  # (N, 1, Hkv, g, 1, 1)
        S = torch.zeros(B, Hkv, g, Dk, Dv, device=dev) if S0 is None else S0.squeeze(3)
        states = []
        for c in range(N):
            states.append(S)
            S = torch.addcmul(dS[:, :, :, c], S, chunk_decay[c])
        before = torch.stack(states, 3)
        final = S
    qi = qf if q_w is None else qf * q_w
    out = out + torch.matmul(qi, before)
    out = (out * scale).reshape(B, Hq, N * C, Dv)[:, :, :T]
    return out.to(q.dtype), final.reshape(B, Hq, Dk, Dv)
