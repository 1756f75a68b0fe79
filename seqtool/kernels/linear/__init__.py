"""Causal linear attention with optional per-head decay: chunked form (fwd + bwd) and a recurrent step."""
from __future__ import annotations

import torch

from seqtool.errors import ShapeError

from .._common import check_float_4d, resolve_backend

__all__ = ["linear_attn", "linear_attn_step"]


def _check(q, k, v, decay, state, op):
    check_float_4d(op, q=q, k=k, v=v)
    B, Hq, T, Dk = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != Dk:
        raise ShapeError(f"{op}: k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, length or head dim")
    Hkv = k.shape[1]
    if tuple(v.shape[:3]) != (B, Hkv, T):
        raise ShapeError(f"{op}: v {tuple(v.shape)} must be (B, Hkv, T, Dv) = ({B}, {Hkv}, {T}, Dv)")
    if Hq % Hkv:
        raise ShapeError(f"{op}: query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if decay is not None:
        if not isinstance(decay, torch.Tensor) or decay.shape != (Hq,) or decay.device != q.device:
            raise ShapeError(f"{op}: decay must be a ({Hq},) tensor of per-head factors on q's device")
        if not bool(((decay > 0) & (decay <= 1)).all()):
            raise ShapeError(f"{op}: decay factors must lie in (0, 1]")
    if state is not None:
        want = (B, Hq, Dk, v.shape[-1])
        if not isinstance(state, torch.Tensor) or tuple(state.shape) != want or state.device != q.device:
            raise ShapeError(f"{op}: state must be a {want} tensor on q's device")
    return B, Hq, Hkv, T, Dk, v.shape[-1]


def linear_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, decay: torch.Tensor | None = None, chunk_size: int = 64,
    initial_state: torch.Tensor | None = None, output_final_state: bool = False, scale: float = 1.0,
    backend: str = "auto",
):
    """Causal linear attention o_t = scale * q_t S_t with S_t = lambda_h S_{t-1} + k_t^T v_t (no softmax).

    q (B, Hq, T, Dk); k (B, Hkv, T, Dk); v (B, Hkv, T, Dv), Hq % Hkv == 0 (k/v shared by query heads of a
    group); decay (Hq,) per-head factor lambda in (0, 1] (None = 1); initial_state (B, Hq, Dk, Dv).
    Feature maps and normalisation are the caller's. Differentiable in q, k, v, initial_state (and decay on the
    torch path). Returns out (B, Hq, T, Dv) in q.dtype, and (out, final_state fp32 (B, Hq, Dk, Dv)) if
    output_final_state. backend: auto (triton on CUDA, torch otherwise), triton, torch, reference.
    """
    op = "linear_attn"
    _check(q, k, v, decay, initial_state, op)
    if chunk_size < 1:
        raise ShapeError(f"{op}: chunk_size must be positive")
    backend = resolve_backend(backend, q.device, op)
    if backend == "triton":
        from .triton_impl import linear_attn_triton

        out, final = linear_attn_triton(q, k, v, decay=decay, chunk_size=chunk_size, scale=scale,
                                        initial_state=initial_state)
    elif backend == "reference":
        from .reference import linear_attn_reference

        out, final = linear_attn_reference(q, k, v, decay=decay, scale=scale, initial_state=initial_state)
    else:
        from .torch_impl import linear_attn_torch

        out, final = linear_attn_torch(q, k, v, decay=decay, chunk_size=chunk_size, scale=scale,
                                       initial_state=initial_state)
    return (out, final) if output_final_state else out


def linear_attn_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor | None, *,
    decay: torch.Tensor | None = None, scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recurrent form for decode: feed T (usually 1) new tokens, carrying the state.

    q (B, Hq, T, Dk); k (B, Hkv, T, Dk); v (B, Hkv, T, Dv); state (B, Hq, Dk, Dv) fp32 or None (zeros).
    Returns (out (B, Hq, T, Dv) in q.dtype, new state fp32). Matches linear_attn with that initial_state.
    """
    B, Hq, Hkv, T, Dk, Dv = _check(q, k, v, decay, state, "linear_attn_step")
    g = Hq // Hkv
    S = torch.zeros(B, Hkv, g, Dk, Dv, device=q.device) if state is None else state.float().view(B, Hkv, g, Dk, Dv)
    lam = None if decay is None else decay.float().view(1, Hkv, g, 1, 1)
    qf = q.float().view(B, Hkv, g, T, Dk)
    kf, vf = k.float(), v.float()
    outs = []
    for t in range(T):
        kv = (kf[:, :, t, :, None] * vf[:, :, t, None, :])[:, :, None]  # (B, Hkv, 1, Dk, Dv), shared by the group
        S = kv + (S if lam is None else lam * S)
        outs.append(torch.matmul(qf[:, :, :, t, None, :], S).squeeze(-2))
    out = (torch.stack(outs, 3) * scale).reshape(B, Hq, T, Dv)
    return out.to(q.dtype), S.reshape(B, Hq, Dk, Dv)
