"""InfLLM: attention sinks + local window + the top-k memory units most relevant to each query chunk.

Units: the keys are cut into memory units of ``block_size`` tokens. When a unit is complete, its ``repr_topk``
*representative tokens* are the keys that received the highest (pre-softmax) scores from the queries of their own
unit that follow them (query heads of a KV group summed); the unit's representative vector is their mean key. A
query chunk (``block_size`` queries; in decode, the step's queries) scores each unit by ``sum(q) · rep`` (InfLLM's
sum over chunk queries of the mean representative score) per KV head, and attends the top units plus the sinks
and the local blocks. The seqtool cache layer keeps the representatives of finished units and the queries of the
unfinished one (see :mod:`seqtool.patches._units`), so every decode step scores a fixed-size table instead of
re-reading keys; no token is discarded (InfLLM offloads far units rather than dropping them).

Budget → units: the budget (key positions per query, resolved at each chunk's last query) is rounded up to whole
units; ``sink_blocks`` initial units and ``local_blocks`` units ending at the chunk's diagonal count towards it,
the rest are the top-scoring memory units. The working set of a query chunk is therefore bounded by the budget.
Prefill runs ``kernels.block_sparse_attn`` (a :class:`BlockSelection`, the same units for every query head of a KV
group); decode runs ``kernels.decode_attn`` on the chosen pages (a :class:`PageSelection`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from seqtool.errors import BadInputError
from seqtool.patches._blocks import BlockPlan, assemble, plan_blocks, query_blocks, topk_middle
from seqtool.patches._units import unit_reps
from seqtool.patches.base import AttentionMethod, AttnCall
from seqtool.patches.cache import SeqtoolCacheLayer
from seqtool.patches.registry import register_method
from seqtool.patches.selection import BlockSelection, PageSelection, Selection


def representative_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, r: int) -> torch.Tensor:
    """Mean of the ``r`` keys of each unit with the highest score from the unit's later queries.

    ``q`` ``(b, Hkv, g, n, U, D)``, ``k`` ``(b, Hkv, n, U, D)`` → ``(b, Hkv, n, D)``. Key ``j`` scores
    ``k_j · sum_{i >= j in the unit} q_i`` (a reverse cumulative sum: no ``U x U`` score matrix).
    """
    later = q.sum(2).flip(3).cumsum(3).flip(3)  # (b, Hkv, n, U, D): sum of queries at positions >= j
    score = (later * k).sum(-1)  # (b, Hkv, n, U)
    r = min(r, k.shape[3])
    top = torch.topk(score, r, dim=-1).indices
    return torch.gather(k, 3, top[..., None].expand(-1, -1, -1, -1, k.shape[-1])).mean(3)


@register_method
@dataclass
class InfLLMMethod(AttentionMethod):
    """InfLLM memory units; see the module docstring."""

    name = "infllm"
    budget_units = ("memory units of block_size tokens per query chunk (sink + local units included), the rest "
                    "the top units by representative-key score")

    block_size: int = 64
    repr_topk: int = 4
    sink_blocks: int = 1
    local_blocks: int = 2

    def validate(self) -> None:
        if self.block_size < 1 or self.repr_topk < 1 or self.sink_blocks < 0 or self.local_blocks < 1:
            raise BadInputError("infllm needs block_size >= 1, repr_topk >= 1, sink_blocks >= 0, local_blocks >= 1")

    def _reps(self, call: AttnCall) -> torch.Tensor:
        r = self.repr_topk
        return unit_reps(call, self.block_size, lambda q, k, v, s: representative_keys(q, k, v, s, r), self.name)

    def _scores(self, plan: BlockPlan, qsum: torch.Tensor, reps: torch.Tensor) -> torch.Tensor:
        """``qsum`` ``(b, Hkv, nq, D)``, ``reps`` ``(b, Hkv, nu, D)`` → ``(b, Hkv, nq, nk)`` (-inf: no unit)."""
        sc = torch.einsum("bhqd,bhud->bhqu", qsum, reps)
        missing = plan.nk - sc.shape[-1]
        return torch.nn.functional.pad(sc, (0, missing), value=float("-inf")) if missing else sc

    def select(self, call: AttnCall) -> Selection:
        bs = self.block_size
        b, hq, tq, d = call.q.shape
        hkv = call.k.shape[1]
        reps = self._reps(call)
        plan = plan_blocks(tq, call.tk, bs, bs, self.budget_rule, self.sink_blocks, self.local_blocks, call.q.device)
        qb, _ = query_blocks(call.q.float(), bs)  # padding queries are zeros: they add nothing to the sum
        qsum = qb.reshape(b, hkv, hq // hkv, plan.nq, bs, d).sum((2, 4))
        chosen = topk_middle(plan, self._scores(plan, qsum, reps))
        index, count = assemble(plan, chosen)
        g = hq // hkv
        return BlockSelection(index.repeat_interleave(g, 1), count.repeat_interleave(g, 1), bs, bs, tq, call.tk)

    def select_decode(self, call: AttnCall) -> Selection:
        b, hq, tq, d = call.q.shape
        hkv = call.k.shape[1]
        reps = self._reps(call)
        plan = plan_blocks(tq, call.tk, tq, self.block_size, self.budget_rule, self.sink_blocks, self.local_blocks,
                           call.q.device)
        qsum = call.q.float().reshape(b, hkv, -1, d).sum(2)[:, :, None]
        chosen = topk_middle(plan, self._scores(plan, qsum, reps))
        index, count = assemble(plan, chosen)
        return PageSelection(index[:, :, 0], count[:, :, 0], self.block_size, call.n_rep, tq, call.tk)

    def make_cache_layer(self, runtime: Any) -> SeqtoolCacheLayer:
        # Holds the unit representatives and the open unit's queries in ``state`` (no eviction).
        return SeqtoolCacheLayer(runtime)
