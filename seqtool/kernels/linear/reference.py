"""Token-by-token recurrence: the definition of (decayed) causal linear attention."""
from __future__ import annotations

import torch


def linear_attn_reference(q, k, v, *, decay=None, scale=1.0, initial_state=None):
    """S_t = lambda_h * S_{t-1} + k_t^T v_t ;  o_t = scale * q_t S_t  (fp32, autograd-friendly).

    q (B, Hq, T, Dk); k (B, Hkv, T, Dk); v (B, Hkv, T, Dv); decay (Hq,) lambda in (0, 1] or None;
    initial_state (B, Hq, Dk, Dv). Returns (out (B, Hq, T, Dv) in q.dtype, final state fp32).
    """
    B, Hq, T, Dk = q.shape
    g = Hq // k.shape[1]
    kf = k.float().repeat_interleave(g, 1)
    vf = v.float().repeat_interleave(g, 1)
    S = q.new_zeros(B, Hq, Dk, v.shape[-1], dtype=torch.float32) if initial_state is None else initial_state.float()
    lam = None if decay is None else decay.float().view(1, Hq, 1, 1)
    outs = []
    for t in range(T):
        kv = kf[:, :, t, :, None] * vf[:, :, t, None, :]
        S = kv + (S if lam is None else lam * S)
        outs.append(scale * (q[:, :, t, None, :].float() @ S).squeeze(2))
    out = torch.stack(outs, 2) if outs else q.new_zeros(B, Hq, 0, v.shape[-1], dtype=torch.float32)
    return out.to(q.dtype), S
