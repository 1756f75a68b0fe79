"""Validation shared by the gated recurrent ops (gated_linear_attn, delta_rule_attn).

Layout: q, k (B, H, T, Dk); v (B, H, T, Dv); log_decay (B, H, T) (one gate per token and head) or
(B, H, T, Dk) (per key dimension, GLA); beta (B, H, T); state (B, H, Dk, Dv) fp32.
"""
from __future__ import annotations

import torch

from seqtool.errors import ShapeError

from ._common import check_float_4d


def check_gated(q, k, v, op: str, *, log_decay=None, beta=None, state=None, per_dim_ok: bool = True):
    """Validate the inputs of a gated recurrent op; returns (B, H, T, Dk, Dv, per_dim)."""
    check_float_4d(op, q=q, k=k, v=v)
    B, H, T, Dk = q.shape
    if tuple(k.shape) != (B, H, T, Dk):
        raise ShapeError(f"{op}: k {tuple(k.shape)} must equal q's shape {tuple(q.shape)}")
    if tuple(v.shape[:3]) != (B, H, T):
        raise ShapeError(f"{op}: v {tuple(v.shape)} must be (B, H, T, Dv) = ({B}, {H}, {T}, Dv)")
    Dv = v.shape[-1]
    per_dim = False
    if log_decay is not None:
        if not isinstance(log_decay, torch.Tensor) or not log_decay.dtype.is_floating_point:
            raise ShapeError(f"{op}: log_decay must be a float tensor")
        if tuple(log_decay.shape) == (B, H, T, Dk) and per_dim_ok:
            per_dim = True
        elif tuple(log_decay.shape) != (B, H, T):
            want = f"({B}, {H}, {T})" + (f" or ({B}, {H}, {T}, {Dk})" if per_dim_ok else "")
            raise ShapeError(f"{op}: log_decay has shape {tuple(log_decay.shape)}, expected {want}")
        if log_decay.device != q.device:
            raise ShapeError(f"{op}: log_decay is on {log_decay.device} but q is on {q.device}")
        # Values are checked on CPU only: on CUDA the check would sync the device on every decode step.
        if log_decay.device.type == "cpu" and log_decay.numel() and bool((log_decay.detach() > 0).any()):
            raise ShapeError(f"{op}: log_decay must be <= 0 (log of a decay factor in (0, 1]); "
                             "use e.g. -softplus(x) or logsigmoid(x)")
    if beta is not None:
        if not isinstance(beta, torch.Tensor) or not beta.dtype.is_floating_point or tuple(beta.shape) != (B, H, T):
            raise ShapeError(f"{op}: beta must be a float ({B}, {H}, {T}) tensor")
        if beta.device != q.device:
            raise ShapeError(f"{op}: beta is on {beta.device} but q is on {q.device}")
    if state is not None:
        want = (B, H, Dk, Dv)
        if not isinstance(state, torch.Tensor) or tuple(state.shape) != want or state.device != q.device:
            raise ShapeError(f"{op}: state must be a {want} tensor (B, H, Dk, Dv) on q's device")
        if not state.dtype.is_floating_point:
            raise ShapeError(f"{op}: state must be a float tensor")
    return B, H, T, Dk, Dv, per_dim


def check_chunk(chunk: int, op: str) -> None:
    if not isinstance(chunk, int) or chunk < 1:
        raise ShapeError(f"{op}: chunk must be a positive integer (got {chunk!r})")
