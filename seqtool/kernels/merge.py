"""Merging partial attention results by their log-sum-exp."""
from __future__ import annotations

import torch

from seqtool.errors import ShapeError


def merge_attn_states(
    out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets into attention over their union.

    out*: (..., T, D); lse*: (..., T) natural-log sum of exp(scores) (-inf = no keys seen).
    Returns (out (..., T, D) in out1's dtype, lse (..., T) fp32). Rows with no keys in either part give 0 / -inf.
    """
    if out1.shape != out2.shape or lse1.shape != lse2.shape or out1.shape[:-1] != lse1.shape:
        raise ShapeError(
            f"merge_attn_states: shapes disagree: out {tuple(out1.shape)}/{tuple(out2.shape)}, "
            f"lse {tuple(lse1.shape)}/{tuple(lse2.shape)}; expected out (..., T, D) and lse (..., T)"
        )
    l1, l2 = lse1.float(), lse2.float()
    m = torch.maximum(l1, l2)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1, w2 = torch.exp(l1 - m_safe), torch.exp(l2 - m_safe)
    total = w1 + w2
    denom = torch.where(total > 0, total, torch.ones_like(total))
    out = (out1.float() * (w1 / denom)[..., None] + out2.float() * (w2 / denom)[..., None]).to(out1.dtype)
    lse = torch.where(total > 0, m_safe + torch.log(denom), torch.full_like(m, float("-inf")))
    return out, lse
