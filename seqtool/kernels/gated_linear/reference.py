"""Token-by-token recurrence: the definition of gated (decayed) linear attention."""
from __future__ import annotations

import torch


def gated_linear_attn_reference(q, k, v, log_decay, *, scale=1.0, initial_state=None):
    """S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t ;  o_t = scale * q_t S_t   (fp32, autograd-friendly).

    q, k (B, H, T, Dk); v (B, H, T, Dv); log_decay g (B, H, T) or (B, H, T, Dk), <= 0;
    initial_state (B, H, Dk, Dv). Returns (out (B, H, T, Dv) in q.dtype, final state fp32 (B, H, Dk, Dv)).
    """
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    S = q.new_zeros(B, H, Dk, Dv, dtype=torch.float32) if initial_state is None else initial_state.float()
    g = log_decay.float()
    if g.dim() == 3:
        g = g[..., None].expand(B, H, T, Dk)
    outs = []
    for t in range(T):
        kv = k[:, :, t, :, None].float() * v[:, :, t, None, :].float()
        S = torch.exp(g[:, :, t, :, None]) * S + kv
        outs.append(scale * (q[:, :, t, None, :].float() @ S).squeeze(2))
    out = torch.stack(outs, 2) if outs else q.new_zeros(B, H, 0, Dv, dtype=torch.float32)
    return out.to(q.dtype), S
