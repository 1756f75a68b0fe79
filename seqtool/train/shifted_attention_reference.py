"""Masked dense references for ``s2attn`` and ``sinklora``: the full ``T x T`` mask written from positions.

Deliberately independent of :mod:`seqtool.train.shifted_attention`'s slot layout: each rule below is stated on
original positions ``i`` (query) and ``j`` (key), ``G`` the group size, ``h = G // 2``, ``T`` the length.

- one group (``G >= T``): ``j <= i`` for every head.
- unshifted heads (``< H // 2``): ``i // G == j // G`` and ``j <= i``.
- s2attn shifted heads: with the LongLoRA roll ``r(p) = (p - h) mod T``: ``r(i) // G == r(j) // G`` and
  ``r(j) <= r(i)``.
- sinklora shifted heads: ``(i + h) // G == (j + h) // G`` and ``j <= i``.
- sinklora, every head: also ``j < sinks`` and ``j <= i``.
- padding: key ``j`` must be valid, except ``j == i`` (kept so no row is empty).
O(T²) memory: for tests only.
"""
from __future__ import annotations

from typing import Any

import torch

#: ``spec`` below is a :class:`seqtool.train.shifted_attention.ShiftedSpec` (``method``, ``group_size``, ``sinks``);
#: not imported: the fast module imports this one for its reference path.
ShiftedSpec = Any


def reference_mask(seq_len: int, n_heads: int, spec: ShiftedSpec) -> torch.Tensor:
    """``(H, T, T)`` bool: True where query i may attend key j."""
    t, g = seq_len, int(spec.group_size)
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    causal = j <= i
    if g >= t:
        return causal.expand(n_heads, t, t).clone()
    h = g // 2
    plain = causal & (i // g == j // g)
    if spec.method == "s2attn":
        ri, rj = (i - h) % t, (j - h) % t
        shifted = (ri // g == rj // g) & (rj <= ri)
    else:
        shifted = causal & ((i + h) // g == (j + h) // g)
        sink = causal & (j < spec.sinks)
        plain, shifted = plain | sink, shifted | sink
    split = n_heads // 2
    return torch.stack([plain if head < split else shifted for head in range(n_heads)])


def reference_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spec: ShiftedSpec, *,
                        key_valid: torch.Tensor | None = None, scaling: float | None = None) -> torch.Tensor:
    """query ``(B, Hq, T, D)``, key/value ``(B, Hkv, T, D)`` -> ``(B, Hq, T, D)``, dense softmax in fp32 (or the input's wider dtype)."""
    b, hq, t, d = query.shape
    n_rep = hq // key.shape[1]
    dt = torch.promote_types(query.dtype, torch.float32)
    k = key.repeat_interleave(n_rep, dim=1).to(dt)
    v = value.repeat_interleave(n_rep, dim=1).to(dt)
    mask = reference_mask(t, hq, spec).to(query.device)[None]  # (1, H, T, T)
    if key_valid is not None:
        eye = torch.eye(t, dtype=torch.bool, device=query.device)
        mask = mask & (key_valid[:, None, None, :] | eye)
    scale = scaling if scaling is not None else d ** -0.5
    scores = (query.to(dt) @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v).to(query.dtype)
