"""Gated linear attention (decay per token and head, or per key dimension): chunked op and recurrent step.

State layout, shared by the chunked op (prefill / training) and the step (decode): S (B, H, Dk, Dv) fp32,
S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t. Feature maps and normalisation are the caller's.
"""
from __future__ import annotations

import torch

from .._common import resolve_backend
from .._gated_common import check_chunk, check_gated

__all__ = ["gated_linear_attn", "gated_linear_attn_step"]


def gated_linear_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, *, chunk: int = 64,
    initial_state: torch.Tensor | None = None, return_state: bool = False, scale: float = 1.0,
    backend: str = "auto",
):
    """Causal gated linear attention  S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,  o_t = scale * q_t S_t.

    q, k (B, H, T, Dk); v (B, H, T, Dv); log_decay g <= 0: (B, H, T) one gate per token and head (Mamba2,
    Lightning, RetNet with a constant) or (B, H, T, Dk) one per key dimension (GLA); initial_state (B, H, Dk, Dv)
    (None = zeros), e.g. the state returned by a previous call or a decode step. Differentiable in q, k, v,
    log_decay and initial_state. Returns out (B, H, T, Dv) in q.dtype, or (out, final_state fp32
    (B, H, Dk, Dv)) with return_state. chunk: tokens per chunk (Triton needs a power of two >= 16).
    backend: auto (triton on CUDA, torch otherwise), triton, torch, reference.
    """
    op = "gated_linear_attn"
    check_gated(q, k, v, op, log_decay=log_decay, state=initial_state)
    check_chunk(chunk, op)
    backend = resolve_backend(backend, q.device, op)
    if backend == "triton":
        from .triton_impl import gated_linear_attn_triton

        out, final = gated_linear_attn_triton(q, k, v, log_decay, chunk=chunk, scale=scale,
                                              initial_state=initial_state)
    elif backend == "reference":
        from .reference import gated_linear_attn_reference

        out, final = gated_linear_attn_reference(q, k, v, log_decay, scale=scale, initial_state=initial_state)
    else:
        from .torch_impl import gated_linear_attn_torch

        out, final = gated_linear_attn_torch(q, k, v, log_decay, chunk=chunk, scale=scale,
                                             initial_state=initial_state)
    return (out, final) if return_state else out


def gated_linear_attn_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, state: torch.Tensor | None, *,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recurrent form for decode: feed T (usually 1) new tokens, carrying the state.

    q, k (B, H, T, Dk); v (B, H, T, Dv); log_decay (B, H, T) or (B, H, T, Dk); state (B, H, Dk, Dv) or None
    (zeros). Returns (out (B, H, T, Dv) in q.dtype, new state fp32 (B, H, Dk, Dv)); equal to gated_linear_attn
    with initial_state=state and return_state=True.
    """
    B, H, T, Dk, Dv, per_dim = check_gated(q, k, v, "gated_linear_attn_step", log_decay=log_decay, state=state)
    S = q.new_zeros(B, H, Dk, Dv, dtype=torch.float32) if state is None else state.float()
    a = torch.exp(log_decay.float())
    a = a[..., None] if per_dim else a[..., None, None]  # (B, H, T, Dk, 1) or (B, H, T, 1, 1)
    qf, kf, vf = q.float(), k.float(), v.float()
    outs = []
    for t in range(T):
        S = torch.addcmul(a[:, :, t] * S, kf[:, :, t, :, None], vf[:, :, t, None, :])
        outs.append(torch.matmul(qf[:, :, t, None, :], S))
    out = torch.cat(outs, 2) if outs else qf.new_zeros(B, H, 0, Dv)
    return (out * scale).to(q.dtype), S
