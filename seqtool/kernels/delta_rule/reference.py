"""Token-by-token recurrence: the definition of the (gated) delta rule (DeltaNet / Gated DeltaNet)."""
from __future__ import annotations

import torch


def delta_rule_reference(q, k, v, beta, *, log_decay=None, scale=1.0, initial_state=None):
    """With a_t = exp(g_t) (1 without a gate), state S (Dk, Dv) per head:

        S'  = a_t S_{t-1}
        S_t = S' + beta_t k_t^T (v_t - k_t S')          (= a_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t)
        o_t = scale * q_t S_t

    q, k (B, H, T, Dk); v (B, H, T, Dv); beta (B, H, T); log_decay g (B, H, T) <= 0 or None;
    initial_state (B, H, Dk, Dv). Returns (out (B, H, T, Dv) in q.dtype, final state fp32 (B, H, Dk, Dv)).
    """
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    S = q.new_zeros(B, H, Dk, Dv, dtype=torch.float32) if initial_state is None else initial_state.float()
    bt = beta.float()
    outs = []
    for t in range(T):
        if log_decay is not None:
            S = torch.exp(log_decay[:, :, t].float())[..., None, None] * S
        kt = k[:, :, t].float()
        old = (kt[:, :, None, :] @ S).squeeze(2)  # (B, H, Dv): what the state recalls for k_t
        delta = bt[:, :, t, None] * (v[:, :, t].float() - old)
        S = S + kt[..., :, None] * delta[..., None, :]
        outs.append(scale * (q[:, :, t, None, :].float() @ S).squeeze(2))
    out = torch.stack(outs, 2) if outs else q.new_zeros(B, H, 0, Dv, dtype=torch.float32)
    return out.to(q.dtype), S
