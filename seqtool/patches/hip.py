"""HiP attention: hierarchically pruned key blocks per query block (training-free, O(T log T) selection).

Budget → units: the budget (key positions per query, resolved at each query block's last query) is rounded up to
whole key blocks of ``block_size`` tokens; ``sink_blocks`` first blocks and ``local_blocks`` blocks ending at the
diagonal are always kept and count towards it; the remaining ``k`` blocks are found by a tree search over the
middle blocks:

1. split the middle range into ``k`` equal segments (the nodes);
2. split every node in two; score each half by its representative key (the key at the centre of the half)
   against the query block (max over its queries of ``q · k``);
3. keep the ``k`` best halves; repeat until every node is one block.

Each round scores ``2k`` representatives per query block and there are ``log2(T / (k * block_size))`` rounds, so the
selection costs ``O(T k log T)`` dot products instead of the ``O(T^2)`` a full block scoring needs. Prefill selects
per query head (a :class:`BlockSelection` for ``kernels.block_sparse_attn``); decode selects pages per KV head (the
query heads of a group pool their scores) and runs ``kernels.decode_attn`` on them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from seqtool.errors import BadInputError
from seqtool.patches._blocks import BlockPlan, assemble, group_queries, plan_blocks, query_blocks
from seqtool.patches.base import AttentionMethod, AttnCall
from seqtool.patches.registry import register_method
from seqtool.patches.selection import BlockSelection, PageSelection, Selection


def tree_search(plan: BlockPlan, qsel: torch.Tensor, qvalid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Hierarchical top-k over the middle key blocks of ``plan``.

    ``qsel`` ``(B, Hkv, S, nq, m, D)``: ``S`` selectors per KV head (query heads, or 1 pooled), ``m`` query vectors
    per query block; ``qvalid`` ``(nq, m)`` marks real (not padding) queries; ``k`` ``(B, Hkv, Tk, D)``.
    Returns chosen block ids ``(B, Hkv, S, nq, K)`` long, -1 for unused slots (``K = plan.k_max``).
    """
    b, hkv, s, nq, m, d = qsel.shape
    kmax = plan.k_max
    dev = qsel.device
    if kmax == 0:
        return torch.zeros(b, hkv, s, nq, 0, dtype=torch.long, device=dev)
    length = (plan.mid_hi - plan.mid_lo)[:, None]
    kq = plan.k[:, None]
    slot = torch.arange(kmax, device=dev)[None, :]
    k_safe = kq.clamp(min=1)
    lo = plan.mid_lo[:, None] + slot * length // k_safe
    hi = plan.mid_lo[:, None] + (slot + 1) * length // k_safe
    live = slot < kq
    hi = torch.where(live, hi, lo)
    shape = (b, hkv, s, nq, kmax)
    lo, hi, live = lo.expand(shape), hi.expand(shape), live.expand(shape)
    qf = qsel.float()
    kf = k.float()
    pad_q = ~qvalid.view(1, 1, 1, nq, m, 1)
    while bool(((hi - lo) > 1).any()):
        size = hi - lo
        mid = lo + (size + 1) // 2
        c_lo = torch.cat([lo, mid], -1)
        c_hi = torch.cat([mid, hi], -1)
        first_tok = c_lo * plan.bk
        end_tok = torch.clamp(c_hi * plan.bk, max=plan.tk)
        rep = ((first_tok + end_tok - 1) // 2).clamp(0, plan.tk - 1)
        reps = torch.gather(kf, 2, rep.reshape(b, hkv, -1, 1).expand(-1, -1, -1, d)).view(b, hkv, s, nq, 2 * kmax, d)
        sc = torch.einsum("bhsqmd,bhsqcd->bhsqmc", qf, reps)
        sc = sc.masked_fill(pad_q, float("-inf")).amax(4)
        sc = sc.masked_fill(c_hi <= c_lo, float("-inf"))
        top = torch.topk(sc, kmax, dim=-1)
        lo = torch.gather(c_lo, -1, top.indices)
        hi = torch.gather(c_hi, -1, top.indices)
        ok = torch.isfinite(top.values) & live
        hi = torch.where(ok, hi, lo)
    return torch.where(hi - lo == 1, lo, -1)


@register_method
@dataclass
class HipMethod(AttentionMethod):
    """HiP hierarchical top-k block selection; see the module docstring."""

    name = "hip"
    budget_units = ("key blocks of block_size tokens per query block (sinks + local blocks included), the rest "
                    "found by a hierarchical top-k tree search")

    block_size: int = 64
    sink_blocks: int = 1
    local_blocks: int = 1

    def validate(self) -> None:
        if self.block_size < 1 or self.sink_blocks < 0 or self.local_blocks < 1:
            raise BadInputError("hip needs block_size >= 1, sink_blocks >= 0 and local_blocks >= 1")

    def _plan(self, call: AttnCall, bq: int) -> BlockPlan:
        return plan_blocks(call.tq, call.tk, bq, self.block_size, self.budget_rule, self.sink_blocks,
                           self.local_blocks, call.q.device)

    def select(self, call: AttnCall) -> Selection:
        bs = self.block_size
        plan = self._plan(call, bs)
        b, hq, _, d = call.q.shape
        hkv = call.k.shape[1]
        qb, valid = query_blocks(call.q, bs)  # (B, Hq, nq, bs, D)
        qsel = qb.reshape(b, hkv, hq // hkv, plan.nq, bs, d)
        chosen = tree_search(plan, qsel, valid, call.k).reshape(b, hq, plan.nq, -1)
        index, count = assemble(plan, chosen)
        return BlockSelection(index, count, bs, bs, call.tq, call.tk)

    def select_decode(self, call: AttnCall) -> Selection:
        plan = self._plan(call, call.tq)
        b, hq, tq, d = call.q.shape
        hkv = call.k.shape[1]
        qsel = group_queries(call.q, hkv).reshape(b, hkv, 1, 1, -1, d)
        valid = torch.ones(1, qsel.shape[4], dtype=torch.bool, device=call.q.device)
        chosen = tree_search(plan, qsel, valid, call.k).reshape(b, hkv, 1, -1)
        index, count = assemble(plan, chosen)
        return PageSelection(index[:, :, 0], count[:, :, 0], self.block_size, call.n_rep, tq, call.tk)
