"""``h2o``: Heavy-Hitter Oracle (Zhang et al., 2023) — keep sinks, a recent window and the heavy hitters.

Every KV entry carries its *accumulated attention*: the softmax attention it has received from every query so
far, summed over the queries and over the query heads of its KV head's group (GQA: one kept set per KV head).
After the prompt (prefill is dense; its scores come from every prompt query) and after every decode step, each
row and KV head keeps its ``sinks`` first tokens, the ``recent`` share of the budget as a window of the latest
tokens, and the highest-scoring of the rest, evicting down to the budget (one token per decode step once full).
Decode attends every kept key (``kernels.decode_attn``) and adds its attention to the kept entries' scores.

Budget → units: KV entries per head for each row (sinks and window included), fixed for the rest of the
sequence: a ratio of the row's prompt length, or a token count (the cache grows to it, then stays there); a
count at or above the sequence length never evicts (exactly dense). Without
:func:`~seqtool.patches.make_cache` nothing can be evicted and the method is dense.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from seqtool.errors import BadInputError
from seqtool.patches._evict import EvictedSelection, EvictingCacheLayer, PrefillScored, attention_mass
from seqtool.patches.base import AttentionMethod, AttnCall
from seqtool.patches.registry import register_method
from seqtool.patches.selection import Selection


@register_method
@dataclass
class H2O(AttentionMethod):
    name: ClassVar[str] = "h2o"
    budget_units: ClassVar[str] = ("KV entries kept per head: budget.tokens(prompt length) = sinks + recent share "
                                   "+ heavy hitters by accumulated attention")

    budget: float | str | None = 0.25
    sinks: int = 4
    recent: float = 0.5

    def validate(self) -> None:
        if self.sinks < 0 or not 0 <= self.recent <= 1:
            raise BadInputError("h2o needs sinks >= 0 and recent in [0, 1] (the budget share of the recent window)")

    def select(self, call: AttnCall) -> Selection:
        cache = call.cache
        if not isinstance(cache, H2OCacheLayer) or self.budget_rule.is_full:
            return self.dense_selection(call)
        if cache.origin is not None:
            return self.select_decode(call)
        return PrefillScored(call, lambda c: cache.pending.append(
            (c.rows, c.key_offset, attention_mass(c.q, c.k, c.scale, c.n_rep))))

    def select_decode(self, call: AttnCall) -> Selection:
        cache = call.cache
        if not isinstance(cache, H2OCacheLayer) or cache.origin is None:
            return self.select(call) if isinstance(cache, H2OCacheLayer) else self.dense_selection(call)
        mass = attention_mass(call.q, call.k, call.scale, call.n_rep)  # what these queries give the kept keys
        cache.score[call.rows, :, call.key_offset:] += mass.to(cache.score.dtype)
        pos = cache.row_positions(call.rows, call.key_offset, call.tk)
        return EvictedSelection(pos, call.n_rep, call.tq, call.tk, call.tk + cache.dropped(call.rows))

    def make_cache_layer(self, runtime: Any) -> "H2OCacheLayer":
        return H2OCacheLayer(runtime, self)


class H2OCacheLayer(EvictingCacheLayer):
    """Accumulated scores per kept slot (``score``); evicts to the budget after every call."""

    def after_attention(self, kv_start: torch.Tensor) -> None:
        m = self.method
        if self.origin is None:
            if not self.pending:
                return
            self.resolve(kv_start, m.budget_rule)
            b, h, length = self.keys.shape[:3]
            self.score = torch.zeros(b, h, length, device=self.keys.device)
            for rows, off, sc in self.pending:
                self.score[rows, :, off:] = sc.to(self.score.device)
            self.pending = []
        rel = self.head_pos - self.origin[:, None, None]
        n_recent = torch.tensor([math.ceil(int(t) * m.recent) for t in self.budget.tolist()],
                                device=rel.device)
        seen = self.seen[:, None, None]
        protect = (rel < m.sinks) | (rel >= seen - n_recent[:, None, None])
        self.evict_to(kv_start, self.score, protect)
