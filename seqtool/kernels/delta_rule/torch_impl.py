"""Chunked (gated) delta rule in PyTorch with the WY representation, differentiable by autograd.

Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length"; the gate as in
Gated DeltaNet. Per chunk of C tokens, state S (Dk, Dv) at the chunk start, b_i in-chunk cumulative log-decay
(0 without a gate), G_ij = e^{b_i - b_j} for j <= i (never an exponent > 0). Unrolling the recurrence, the
pseudo-values u_i = beta_i (v_i - k_i S'_i) satisfy  (I + L) U = diag(beta) V - diag(beta e^b) K S  with L
strictly lower, L_ij = beta_i (k_i . k_j) G_ij. One triangular solve per chunk (all chunks batched) gives the WY
factors  U~ = (I+L)^-1 diag(beta) V,  W = (I+L)^-1 diag(beta e^b) K,  so U = U~ - W S, and

    out     = scale * [ A U~ + (Q e^b - A W) S ],   A_ij = (q_i . k_j) G_ij  (j <= i)
    S_next  = (e^{b_C} I - K'^T W) S + K'^T U~,     K' = K * e^{b_C - b}

Only the last line loops (one (Dk, Dk) x (Dk, Dv) product per chunk); everything else is batched over chunks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import cdiv


def _delta_rule_torch_segment(q, k, v, beta, *, log_decay=None, chunk=64, scale=1.0, initial_state=None):
    """Same math as reference.delta_rule_reference. Returns (out (B, H, T, Dv) in q.dtype, state fp32)."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    C = min(chunk, max(T, 1))
    N = max(cdiv(T, C), 1)
    pad = N * C - T
    dev = q.device
    qf = F.pad(q.float(), (0, 0, 0, pad)).view(B, H, N, C, Dk)
    kf = F.pad(k.float(), (0, 0, 0, pad)).view(B, H, N, C, Dk)
    vf = F.pad(v.float(), (0, 0, 0, pad)).view(B, H, N, C, Dv)
    bt = F.pad(beta.float(), (0, pad)).view(B, H, N, C, 1)  # beta = 0 on padding: the state ignores it
    causal = torch.ones(C, C, dtype=torch.bool, device=dev).tril()
    kk = kf @ kf.transpose(-1, -2)
    qk = qf @ kf.transpose(-1, -2)
    if log_decay is None:
        L = (bt * kk).tril(-1)
        A = qk.masked_fill(~causal, 0.0)
        rhs = torch.cat([bt * vf, bt * kf], -1)
    else:
        b = F.pad(log_decay.float(), (0, pad)).view(B, H, N, C).cumsum(3)
        G = torch.exp((b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")))
        L = (bt * kk * G).tril(-1)
        A = qk * G
        eb = torch.exp(b)[..., None]
        rhs = torch.cat([bt * vf, bt * eb * kf], -1)
    X = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True)  # (I + L)^-1 rhs
    Ut, W = X[..., :Dv], X[..., Dv:]
    if log_decay is None:
        qg, kg, chunk_decay = qf, kf, None
    else:
        blast = b[..., -1:]
        qg, kg = qf * eb, kf * torch.exp(blast - b)[..., None]
        chunk_decay = torch.exp(blast)[..., None]  # (B, H, N, 1, 1)
    qp = qg - A @ W  # (B, H, N, C, Dk)
    kgt = kg.transpose(-1, -2)
    M = -(kgt @ W)  # (B, H, N, Dk, Dk); + e^{b_C} I below
    eye = torch.eye(Dk, device=dev)
    M = M + (eye if chunk_decay is None else chunk_decay * eye)
    D = kgt @ Ut  # (B, H, N, Dk, Dv)
    S = q.new_zeros(B, H, Dk, Dv, dtype=torch.float32) if initial_state is None else initial_state.float()
    states = []
    for n in range(N):
        states.append(S)
        S = torch.baddbmm(D[:, :, n].reshape(B * H, Dk, Dv), M[:, :, n].reshape(B * H, Dk, Dk),
                          S.reshape(B * H, Dk, Dv)).view(B, H, Dk, Dv)
    before = torch.stack(states, 2)
    out = (A @ Ut + qp @ before) * scale
    return out.reshape(B, H, N * C, Dv)[:, :, :T].to(q.dtype), S


def delta_rule_torch(q, k, v, beta, *, log_decay=None, chunk=64, scale=1.0, initial_state=None, segment=512):
    """Same math as reference.delta_rule_reference. Returns (out (B, H, T, Dv) in q.dtype, state fp32).

    Runs segments of ~``segment`` tokens one after the other, carrying the state, so every intermediate has a
    fixed, cache-friendly size and the time per token does not grow with T (large fresh buffers page-fault on
    CPU).
    """
    T = q.shape[2]
    seg = max(chunk, segment // chunk * chunk)
    if T <= seg:
        return _delta_rule_torch_segment(q, k, v, beta, log_decay=log_decay, chunk=chunk, scale=scale,
                                         initial_state=initial_state)
    outs, state = [], initial_state
    for t0 in range(0, T, seg):
        sl = slice(t0, t0 + seg)
        o, state = _delta_rule_torch_segment(q[:, :, sl], k[:, :, sl], v[:, :, sl], beta[:, :, sl],
                                             log_decay=None if log_decay is None else log_decay[:, :, sl],
                                             chunk=chunk, scale=scale, initial_state=state)
        outs.append(o)
    return torch.cat(outs, 2), state
