"""Vertical-slash (MInference) pattern -> block list + explicit key columns for block_sparse_attn."""
from __future__ import annotations

import torch

from .._common import cdiv


def _valid_prefix(x: torch.Tensor, count: torch.Tensor | None) -> torch.Tensor:
    """(..., N) bool marking entries before `count` (all when count is None)."""
    ar = torch.arange(x.shape[-1], device=x.device)
    if count is None:
        return torch.ones_like(x, dtype=torch.bool)
    return ar < count.long()[..., None]


def vertical_slash_index(
    vertical_index: torch.Tensor, slash_index: torch.Tensor, Tq: int, Tk: int, *, block_q: int = 64,
    block_k: int = 64, vertical_count: torch.Tensor | None = None, slash_count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Convert a vertical-slash pattern into (block_index, block_count, column_index, column_count).

    vertical_index (B, H, NV): absolute key positions attended by every (later) query.
    slash_index (B, H, NS): diagonal offsets o >= 0 (query at position p attends key p - o); like MInference,
    each slash covers whole key blocks: the blocks its line crosses inside each query block.
    Out-of-range entries and entries past *_count are ignored. Returns int32 tensors shaped for
    block_sparse_attn: blocks sorted ascending, columns sorted ascending, unique, outside the listed blocks.
    """
    B, H, _ = slash_index.shape
    dev = slash_index.device
    nq, nkb = cdiv(Tq, block_q), cdiv(Tk, block_k)
    off = Tk - Tq
    J = torch.arange(nq, device=dev)
    p0 = off + J * block_q
    p1 = off + torch.clamp((J + 1) * block_q, max=Tq) - 1

    o = slash_index.long()[:, :, None, :]  # (B, H, 1, NS)
    ok = _valid_prefix(slash_index, slash_count)[:, :, None, :] & (o >= 0)
    lo_key = (p0[:, None] - o).clamp(min=0)
    hi_key = p1[:, None] - o
    ok = ok & (hi_key >= 0)
    lo = torch.where(ok, lo_key // block_k, torch.full_like(lo_key, nkb))
    hi = torch.where(ok, hi_key // block_k + 1, torch.full_like(hi_key, nkb))
    # Difference array over key blocks: +1 at the first covered block, -1 after the last.
    diff = torch.zeros(B, H, nq, nkb + 1, dtype=torch.int32, device=dev)
    one = torch.ones_like(lo, dtype=torch.int32)
    diff.scatter_add_(-1, lo, one)
    diff.scatter_add_(-1, hi, -one)
    bmask = diff.cumsum(-1)[..., :nkb] > 0
    block_count = bmask.sum(-1, dtype=torch.int32)
    width = max(int(block_count.max()) if block_count.numel() else 0, 1)
    block_index = _compact(bmask, torch.arange(nkb, device=dev).expand_as(bmask), width)

    t, _ = torch.sort(torch.where(_valid_prefix(vertical_index, vertical_count) & (vertical_index >= 0)
                                  & (vertical_index < Tk), vertical_index.long(),
                                  torch.full_like(vertical_index, Tk, dtype=torch.long)), dim=-1)
    fresh = torch.ones_like(t, dtype=torch.bool)
    fresh[..., 1:] = t[..., 1:] != t[..., :-1]
    t = t[:, :, None, :]  # (B, H, 1, NV)
    in_block = bmask.gather(-1, (t.clamp(max=Tk - 1) // block_k).expand(B, H, nq, t.shape[-1]))
    keep = fresh[:, :, None, :] & (t < Tk) & (t <= p1[:, None]) & ~in_block
    column_count = keep.sum(-1, dtype=torch.int32)
    cwidth = max(int(column_count.max()) if column_count.numel() else 0, 1)
    column_index = _compact(keep, t.expand(B, H, nq, t.shape[-1]), cwidth)
    return block_index, block_count, column_index, column_count


def _compact(keep: torch.Tensor, values: torch.Tensor, width: int) -> torch.Tensor:
    """values[keep] packed to the front of each row, order kept, as int32 (..., width); the rest 0.

    A cumsum + scatter: linear, where a stable argsort of the keep mask would sort every row.
    """
    slot = torch.where(keep, keep.cumsum(-1, dtype=torch.int32) - 1, width).long()
    out = torch.zeros(keep.shape[:-1] + (width + 1,), dtype=torch.int32, device=keep.device)
    out.scatter_(-1, slot, values.to(torch.int32))
    return out[..., :width].contiguous()
