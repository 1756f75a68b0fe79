"""Key-block geometry shared by the block-selecting methods (hip, infllm, longheads).

Every query block keeps three kinds of key blocks: *sinks* (the first ``sink_blocks`` blocks), *local* blocks (the
``local_blocks`` blocks ending at the block that holds the query block's last query, diagonal included) and a
method-chosen subset of the *middle* blocks in between. The budget (key positions per query, see
:mod:`seqtool.patches.budget`) is resolved at the query block's last query and rounded up to whole blocks; sinks and
local blocks count towards it, the rest is what the method picks from the middle.

Queries are aligned to the end of the keys (query ``i`` sits at key position ``tk - tq + i``); block ``b`` holds
keys ``[b * bk, (b + 1) * bk)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from seqtool.patches.budget import Budget


@dataclass
class BlockPlan:
    """Per query block (all ``(nq,)`` long): ``mid_lo``/``mid_hi`` bound the middle blocks ``[mid_lo, mid_hi)``
    (sinks are ``[0, mid_lo)``, local blocks ``[mid_hi, last_blk]``); ``k`` = middle blocks to pick."""

    tq: int
    tk: int
    bq: int
    bk: int
    first_pos: torch.Tensor
    last_pos: torch.Tensor
    mid_lo: torch.Tensor
    mid_hi: torch.Tensor
    last_blk: torch.Tensor
    k: torch.Tensor

    @property
    def nq(self) -> int:
        return self.first_pos.shape[0]

    @property
    def nk(self) -> int:
        return -(-self.tk // self.bk)

    @property
    def k_max(self) -> int:
        return int(self.k.max()) if self.k.numel() else 0


def plan_blocks(tq: int, tk: int, bq: int, bk: int, budget: Budget, sink_blocks: int, local_blocks: int,
                device: torch.device | str, max_tokens: int | None = None) -> BlockPlan:
    """Resolve the budget into sinks / local / ``k`` middle blocks per query block. ``max_tokens`` caps the kept
    key positions (LongHeads' trained length)."""
    nq = -(-tq // bq)
    first = torch.arange(nq, device=device) * bq + (tk - tq)
    last = torch.clamp(first + bq - 1, max=tk - 1)
    first_blk, last_blk = first // bk, last // bk
    local_lo = torch.clamp(first_blk - (local_blocks - 1), min=0)
    mid_lo = torch.clamp(torch.full_like(local_lo, sink_blocks), max=local_lo)
    ctx = (last + 1).tolist()
    tokens = torch.tensor([budget.tokens(c) for c in ctx], device=device, dtype=torch.long)
    if max_tokens:
        tokens = tokens.clamp(max=max_tokens)
    keep = -(-tokens // bk)
    forced = mid_lo + (last_blk - local_lo + 1)
    k = torch.clamp(keep - forced, min=0)
    k = torch.minimum(k, local_lo - mid_lo)
    return BlockPlan(tq, tk, bq, bk, first, last, mid_lo, local_lo, last_blk, k)


def topk_middle(plan: BlockPlan, scores: torch.Tensor) -> torch.Tensor:
    """Pick the ``plan.k`` best middle blocks per query block from ``scores`` ``(..., nq, nk)``.

    Returns block ids ``(..., nq, k_max)`` long, -1 where a query block keeps fewer.
    """
    kmax = plan.k_max
    if kmax == 0:
        return scores.new_zeros(scores.shape[:-1] + (0,), dtype=torch.long)
    blk = torch.arange(scores.shape[-1], device=scores.device)
    middle = (blk >= plan.mid_lo[:, None]) & (blk < plan.mid_hi[:, None])  # (nq, nk)
    masked = scores.float().masked_fill(~middle, float("-inf"))
    top = torch.topk(masked, kmax, dim=-1)
    slot = torch.arange(kmax, device=scores.device)
    ok = (slot < plan.k[:, None]) & torch.isfinite(top.values)
    return torch.where(ok, top.indices, -1)


def assemble(plan: BlockPlan, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sinks + ``chosen`` middle blocks ``(B, H, nq, K)`` (-1 = none) + local blocks → ``block_index``
    ``(B, H, nq, M)`` int32 (ascending, unused slots at the end) and ``block_count`` ``(B, H, nq)`` int32."""
    b, h, nq, _ = chosen.shape
    dev = chosen.device
    n_sink = int(plan.mid_lo.max()) if nq else 0
    n_local = int((plan.last_blk - plan.mid_hi + 1).max()) if nq else 0
    sink = torch.arange(n_sink, device=dev)[None, :].expand(nq, -1)
    sink = torch.where(sink < plan.mid_lo[:, None], sink, -1)
    local = plan.mid_hi[:, None] + torch.arange(n_local, device=dev)[None, :]
    local = torch.where(local <= plan.last_blk[:, None], local, -1)
    fixed = torch.cat([sink, local], -1)[None, None].expand(b, h, -1, -1)
    ids = torch.cat([fixed, chosen.long()], -1)
    big = plan.nk + 1
    ordered = torch.sort(torch.where(ids >= 0, ids, big), dim=-1).values
    count = (ordered < big).sum(-1)
    index = torch.where(ordered < big, ordered, 0)
    return index.to(torch.int32).contiguous(), count.to(torch.int32).contiguous()


def query_blocks(q: torch.Tensor, bq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` ``(B, H, Tq, D)`` → zero-padded blocks ``(B, H, nq, bq, D)`` and a validity mask ``(nq, bq)``."""
    b, h, tq, d = q.shape
    nq = -(-tq // bq)
    pad = nq * bq - tq
    qp = torch.nn.functional.pad(q, (0, 0, 0, pad)) if pad else q
    valid = (torch.arange(nq * bq, device=q.device) < tq).view(nq, bq)
    return qp.reshape(b, h, nq, bq, d), valid


def group_queries(q: torch.Tensor, n_kv: int) -> torch.Tensor:
    """``(B, Hq, T, D)`` → ``(B, Hkv, g, T, D)`` (query heads of each KV head; a view, nothing copied)."""
    b, hq, t, d = q.shape
    return q.reshape(b, n_kv, hq // n_kv, t, d)
