"""HiP attention: hierarchically pruned keys per query block (training-free, O(T log T) selection).

Budget → units: the budget (key positions per query, resolved at each query block's last query) counts the
``sink_blocks`` first blocks and the ``local_blocks`` blocks ending at the diagonal (blocks of ``block_size``
tokens, always kept); the remaining positions are found by a tree search over the middle keys in leaves of
``key_block`` tokens (HiP's ``block_size_k``: 2 in the official code; 1 here by default, which keeps more of
the answer queries' attention on the 4-layer ``ref`` — recall 0.91 vs 0.85 at budget 0.25, see docs/patches.md):

1. split the middle range into ``k`` equal segments (the nodes), ``k`` = remaining positions / ``key_block``;
2. split every node in two; score each half by its representative key (the key at the centre of the half)
   against the query block (max over every ``query_stride``-th query of ``q · k``: 16 of a 64-query block, as
   the official 32-query blocks with ``reduce_stride=2``);
3. keep the ``k`` best halves; repeat until every node is one leaf.

Each round scores ``2k`` representatives per query block and there are ``log2(T / (k * key_block))`` rounds, so
the selection costs ``O(T k log T)`` dot products instead of the ``O(T^2)`` a full scoring needs; per round it
costs about ``1 / query_stride`` of the attention over the kept keys, so at large budgets (one or two rounds)
it is a real share of the work. Leaves of a few
tokens matter: with 64-token leaves the last rounds judge a 32-token half by one key and miss a needle a retrieval
head attends (``benchmarks/sparse_recall.py``: passkey 0.00 on ``ref`` at budget 0.5 with ``key_block=64``).
Prefill selects per query head (sinks + local as key blocks, the chosen leaves as key columns: a
:class:`ColumnBlockSelection` for ``kernels.block_sparse_attn``); decode selects per KV head (the query heads of a
group pool their scores: max over them) and attends the gathered positions (:class:`TokenSelection`,
``kernels.decode_attn``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from seqtool.errors import BadInputError
from seqtool.patches._blocks import BlockPlan, assemble, group_queries, plan_blocks, query_blocks
from seqtool.patches.base import AttentionMethod, AttnCall
from seqtool.patches.registry import register_method
from seqtool.patches.selection import ColumnBlockSelection, Selection, TokenSelection

#: Query blocks searched at once (bounds the ``(nq, m, 2k)`` score temporaries on long inputs).
_NQ_CHUNK = 16


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


def leaf_plan(plan: BlockPlan, leaf: int) -> BlockPlan:
    """``plan`` (middle range and ``k`` in key blocks) re-expressed in leaves of ``leaf`` tokens."""
    per = plan.bk // leaf
    return dataclasses.replace(plan, bk=leaf, mid_lo=plan.mid_lo * per, mid_hi=plan.mid_hi * per, k=plan.k * per)


def _slice(plan: BlockPlan, a: int, b: int) -> BlockPlan:
    return dataclasses.replace(plan, first_pos=plan.first_pos[a:b], last_pos=plan.last_pos[a:b],
                               mid_lo=plan.mid_lo[a:b], mid_hi=plan.mid_hi[a:b], last_blk=plan.last_blk[a:b],
                               k=plan.k[a:b])


def leaves_to_tokens(leaves: torch.Tensor, leaf: int) -> torch.Tensor:
    """Leaf ids ``(..., K)`` (-1 = none) → ascending token positions ``(..., K * leaf)`` (-1 = none, at the end)."""
    tok = leaves[..., None] * leaf + torch.arange(leaf, device=leaves.device)
    return _sorted_valid(torch.where(leaves[..., None] >= 0, tok, -1).flatten(-2))


def _sorted_valid(tok: torch.Tensor) -> torch.Tensor:
    """Ascending along the last dim with the -1 entries moved to the end."""
    big = torch.iinfo(torch.long).max
    ordered = torch.sort(torch.where(tok >= 0, tok, big), -1).values
    return torch.where(ordered == big, -1, ordered)


@register_method
@dataclass
class HipMethod(AttentionMethod):
    """HiP hierarchical top-k key selection; see the module docstring."""

    name = "hip"
    budget_units = ("key positions per query block: sink + local blocks of block_size, the rest leaves of "
                    "key_block tokens found by a hierarchical top-k tree search")

    block_size: int = 64
    key_block: int = 1
    query_stride: int = 4
    sink_blocks: int = 1
    local_blocks: int = 1

    def validate(self) -> None:
        if self.block_size < 1 or self.sink_blocks < 0 or self.local_blocks < 1:
            raise BadInputError("hip needs block_size >= 1, sink_blocks >= 0 and local_blocks >= 1")
        if self.key_block < 1 or self.block_size % self.key_block or self.query_stride < 1:
            raise BadInputError("hip needs key_block >= 1 dividing block_size, and query_stride >= 1")

    def _plan(self, call: AttnCall, bq: int) -> BlockPlan:
        return plan_blocks(call.tq, call.tk, bq, self.block_size, self.budget_rule, self.sink_blocks,
                           self.local_blocks, call.q.device)

    def select(self, call: AttnCall) -> Selection:
        bs, kb = self.block_size, self.key_block
        plan = self._plan(call, bs)
        b, hq, _, d = call.q.shape
        hkv = call.k.shape[1]
        qb, valid = query_blocks(call.q, bs)  # (B, Hq, nq, bs, D)
        qb, valid = qb[:, :, :, :: self.query_stride], valid[:, :: self.query_stride]
        qsel = qb.reshape(b, hkv, hq // hkv, plan.nq, qb.shape[3], d)
        leaves = leaf_plan(plan, kb)
        parts = []
        for a in range(0, plan.nq, _NQ_CHUNK):
            e = min(plan.nq, a + _NQ_CHUNK)
            sub = _slice(leaves, a, e)
            chosen = tree_search(sub, qsel[:, :, :, a:e], valid[a:e], call.k)  # (B, Hkv, g, n, K)
            if chosen.shape[-1] < leaves.k_max:
                chosen = torch.nn.functional.pad(chosen, (0, leaves.k_max - chosen.shape[-1]), value=-1)
            parts.append(chosen)
        chosen = torch.cat(parts, 3).reshape(b, hq, plan.nq, -1)
        cols = leaves_to_tokens(chosen, kb)
        count = (cols >= 0).sum(-1).to(torch.int32)
        index, bcount = assemble(plan, chosen.new_full((b, hq, plan.nq, 0), -1))
        return ColumnBlockSelection(index, bcount, bs, bs, call.tq, call.tk,
                                    column_index=cols.clamp(min=0).to(torch.int32).contiguous(),
                                    column_count=count.contiguous())

    def select_decode(self, call: AttnCall) -> Selection:
        bs, kb = self.block_size, self.key_block
        plan = self._plan(call, call.tq)
        b, hq, tq, d = call.q.shape
        hkv = call.k.shape[1]
        qsel = group_queries(call.q, hkv).reshape(b, hkv, 1, 1, -1, d)
        valid = torch.ones(1, qsel.shape[4], dtype=torch.bool, device=call.q.device)
        chosen = tree_search(leaf_plan(plan, kb), qsel, valid, call.k).reshape(b, hkv, -1)
        middle = leaves_to_tokens(chosen, kb)
        dev = call.q.device
        sinks = torch.arange(int(plan.mid_lo[0]) * bs, device=dev)
        local = torch.arange(int(plan.mid_hi[0]) * bs, call.tk, device=dev)
        fixed = torch.cat([sinks, local])[None, None].expand(b, hkv, -1)
        index = _sorted_valid(torch.cat([fixed, middle], -1))
        return TokenSelection(index, call.n_rep, tq, call.tk)
