"""Triton path of gated_linear_attn: the shared recurrent kernels (forward + backward) of _triton_recurrent."""
from __future__ import annotations

from .._triton_recurrent import recurrent_triton


def gated_linear_attn_triton(q, k, v, log_decay, *, chunk=64, scale=1.0, initial_state=None):
    """Returns (out (B, H, T, Dv) in q.dtype, final state fp32 (B, H, Dk, Dv)); differentiable in every input."""
    return recurrent_triton(q, k, v, log_decay=log_decay, initial_state=initial_state, scale=scale, chunk=chunk)
