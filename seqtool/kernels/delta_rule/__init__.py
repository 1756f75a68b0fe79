"""The (gated) delta rule of DeltaNet / Gated DeltaNet: chunked op (WY representation) and recurrent step.

State layout, shared by the chunked op (prefill / training) and the step (decode): S (B, H, Dk, Dv) fp32,
S_t = a_t S_{t-1} + beta_t k_t^T (v_t - a_t k_t S_{t-1}), a_t = exp(g_t) (1 without a gate), o_t = scale q_t S_t.
Keys are usually L2-normalised and beta in (0, 1) (sigmoid); that is the caller's job.
"""
from __future__ import annotations

import torch

from .._common import resolve_backend
from .._gated_common import check_chunk, check_gated

__all__ = ["delta_rule_attn", "delta_rule_attn_step"]


def delta_rule_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *, log_decay: torch.Tensor | None = None,
    chunk: int = 64, initial_state: torch.Tensor | None = None, return_state: bool = False, scale: float = 1.0,
    backend: str = "auto",
):
    """Causal delta-rule attention  S_t = a_t S_{t-1} + beta_t k_t^T (v_t - a_t k_t S_{t-1}),  o_t = scale q_t S_t.

    q, k (B, H, T, Dk); v (B, H, T, Dv); beta (B, H, T) write strength; log_decay g = log a (B, H, T) <= 0 for
    Gated DeltaNet or None (DeltaNet); initial_state (B, H, Dk, Dv) (None = zeros), e.g. the state of a previous
    call or decode step. Differentiable in q, k, v, beta, log_decay and initial_state. Returns out (B, H, T, Dv)
    in q.dtype, or (out, final_state fp32 (B, H, Dk, Dv)) with return_state. chunk: tokens per chunk of the
    WY form (Triton needs a power of two >= 16). backend: auto (triton on CUDA, torch otherwise), triton, torch,
    reference.
    """
    op = "delta_rule_attn"
    check_gated(q, k, v, op, log_decay=log_decay, beta=beta, state=initial_state, per_dim_ok=False)
    check_chunk(chunk, op)
    backend = resolve_backend(backend, q.device, op)
    if backend == "triton":
        from .triton_impl import delta_rule_triton

        out, final = delta_rule_triton(q, k, v, beta, log_decay=log_decay, chunk=chunk, scale=scale,
                                       initial_state=initial_state)
    elif backend == "reference":
        from .reference import delta_rule_reference

        out, final = delta_rule_reference(q, k, v, beta, log_decay=log_decay, scale=scale,
                                          initial_state=initial_state)
    else:
        from .torch_impl import delta_rule_torch

        out, final = delta_rule_torch(q, k, v, beta, log_decay=log_decay, chunk=chunk, scale=scale,
                                      initial_state=initial_state)
    return (out, final) if return_state else out


def delta_rule_attn_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, state: torch.Tensor | None, *,
    log_decay: torch.Tensor | None = None, scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recurrent form for decode: feed T (usually 1) new tokens, carrying the state.

    q, k (B, H, T, Dk); v (B, H, T, Dv); beta (B, H, T); log_decay (B, H, T) or None; state (B, H, Dk, Dv) or
    None (zeros). Returns (out (B, H, T, Dv) in q.dtype, new state fp32 (B, H, Dk, Dv)); equal to
    delta_rule_attn with initial_state=state and return_state=True.
    """
    B, H, T, Dk, Dv, _ = check_gated(q, k, v, "delta_rule_attn_step", log_decay=log_decay, beta=beta, state=state,
                                     per_dim_ok=False)
    S = q.new_zeros(B, H, Dk, Dv, dtype=torch.float32) if state is None else state.float()
    qf, kf, vf, bf = q.float(), k.float(), v.float(), beta.float()
    a = None if log_decay is None else torch.exp(log_decay.float())[..., None, None]
    outs = []
    for t in range(T):
        if a is not None:
            S = a[:, :, t] * S
        kt = kf[:, :, t, None, :]  # (B, H, 1, Dk)
        delta = bf[:, :, t, None, None] * (vf[:, :, t, None, :] - torch.matmul(kt, S))  # (B, H, 1, Dv)
        S = S + torch.matmul(kt.transpose(-1, -2), delta)
        outs.append(torch.matmul(qf[:, :, t, None, :], S))
    out = torch.cat(outs, 2) if outs else qf.new_zeros(B, H, 0, Dv)
    return (out * scale).to(q.dtype), S
