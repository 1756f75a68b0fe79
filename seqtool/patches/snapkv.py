"""``snapkv``: SnapKV (Li et al., 2024) — compress the prompt's KV cache once, by what its last queries attend.

After the prompt (the first call of a sequence; prefill itself is dense), every KV head scores each prompt key by
the softmax attention it receives from the *observation window* — the last ``window`` prompt queries, summed over
them and over the query heads of the KV head's group (GQA: one kept set per KV head, shared by its query heads) —
smooths the scores with a 1-D pool of ``kernel`` keys (``pool=max``; ``avg`` is the official code's; SnapKV
keeps clusters around the peaks, not isolated tokens), and keeps the top keys plus the window itself. Decode
attends every kept key (``kernels.decode_attn``); decoded tokens are all kept (SnapKV compresses only the prompt).

Budget → units: ``tokens = budget.tokens(prompt length)`` KV entries per head (window included) for each row;
a budget at or above the prompt length evicts nothing (exactly dense). Without
:func:`~seqtool.patches.make_cache` nothing can be evicted and the method is dense.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from seqtool.errors import BadInputError
from seqtool.patches._evict import EvictedSelection, EvictingCacheLayer, PrefillScored, attention_mass
from seqtool.patches.base import AttentionMethod, AttnCall
from seqtool.patches.registry import register_method
from seqtool.patches.selection import Selection


def window_scores(call: AttnCall, window: int, kernel: int, pool: str = "max") -> torch.Tensor:
    """``(b, Hkv, Tk)`` SnapKV key scores: attention mass from the last ``window`` queries, pooled over ``kernel``
    keys (``pool``: ``max`` or ``avg``, the official code's default). As the official code, only the keys before
    the window are pooled, among themselves (the window is kept anyway; its mass must not spill onto the keys
    next to it); the window's keys keep their raw mass."""
    w = min(window, call.tq)
    mass = attention_mass(call.q[:, :, -w:], call.k, call.scale, call.n_rep)
    n = call.tk - w
    if kernel > 1 and n > 0:
        fn = torch.nn.functional.max_pool1d if pool == "max" else torch.nn.functional.avg_pool1d
        pooled = fn(mass[..., :n], kernel, stride=1, padding=kernel // 2)[..., :n]
        mass = torch.cat([pooled, mass[..., n:]], -1)
    return mass


def prompt_scored_select(method: AttentionMethod, call: AttnCall, score) -> Selection:
    """``select`` of the methods that score the prompt's keys once and evict from a :class:`SnapKVCacheLayer`:
    after eviction the kept keys; dense at full budget (or without that cache layer); else dense prefill whose keys
    are scored by ``score(call) -> (B, Hkv, K)`` and queued for the cache layer to evict."""
    cache = call.cache
    if isinstance(cache, SnapKVCacheLayer) and cache.origin is not None:
        return cache.kept_selection(call)
    if not isinstance(cache, SnapKVCacheLayer) or method.budget_rule.is_full:
        return method.dense_selection(call)
    return PrefillScored(call, lambda c: cache.pending.append((c.rows, c.key_offset, score(c))))


@register_method
@dataclass
class SnapKV(AttentionMethod):
    name: ClassVar[str] = "snapkv"
    budget_units: ClassVar[str] = "KV entries kept per head after the prompt: budget.tokens(prompt length), window included"

    budget: float | str | None = 0.25
    window: int = 32
    kernel: int = 5
    pool: str = "max"

    def validate(self) -> None:
        if self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0 or self.pool not in ("max", "avg"):
            raise BadInputError("snapkv needs window >= 1, an odd kernel >= 1 and pool=max or pool=avg")

    def select(self, call: AttnCall) -> Selection:
        return prompt_scored_select(self, call, lambda c: window_scores(c, self.window, self.kernel, self.pool))

    def make_cache_layer(self, runtime: Any) -> "SnapKVCacheLayer":
        return SnapKVCacheLayer(runtime, self)


class SnapKVCacheLayer(EvictingCacheLayer):
    """Evicts once, after the prompt: per row and KV head the ``budget`` best-scored keys + the window."""

    def kept_selection(self, call: AttnCall) -> EvictedSelection:
        pos = self.row_positions(call.rows, call.key_offset, call.tk)
        return EvictedSelection(pos, call.n_rep, call.tq, call.tk, call.tk + self.dropped(call.rows))

    def after_attention(self, kv_start: torch.Tensor) -> None:
        if self.origin is not None or not self.pending:
            return
        m = self.method
        self.resolve(kv_start, m.budget_rule)
        b, h, length = self.keys.shape[:3]
        score = torch.zeros(b, h, length, device=self.keys.device)
        protect = torch.zeros(b, h, length, dtype=torch.bool, device=self.keys.device)
        for rows, off, sc in self.pending:
            score[rows, :, off:] = sc.to(score.device)
            protect[rows, :, max(off, length - m.window):] = True  # the observation window stays
        self.pending = []
        self.evict_to(kv_start, score, protect)
