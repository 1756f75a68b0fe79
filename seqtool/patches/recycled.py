"""``recycled``: Recycled Attention for decode (Xu et al., 2024).

At the end of prefill and then whenever a full step is due, a *full* step attends every key and records, per KV
head, the ``K`` keys with the most attention mass (summed over the query heads of the group). The steps in
between attend only those ``K`` keys plus every token that came after the full step. Prefill is dense.

When a full step is due (the paper's fixed stride and its dynamic variant): every ``stride`` steps, and, with
``sim`` > -1, whenever the step's query has drifted from the query of the last full step (cosine similarity,
mean over the layer's heads, below ``sim``). The dynamic rule is on by default (``sim=0.5``) because a fixed
stride recycles the top-K of a query that did not need what the next ones need: on ``ref`` the last prefill
query is filler text, the following steps decode the question, and with ``stride`` alone every passkey is lost
at budget 0.5 (answer-query recall 0.84); with ``sim=0.5`` passkey is kept down to budget 0.25 at a measured
decode kept fraction of 0.44 (docs/patches.md). ``sim=-1`` is the fixed-stride schedule.

Budget → units: ``K = budget.tokens(context at the full step)``; ``stride`` (the refresh interval S) is separate.
The top-K indices live in the cache layer (:func:`~seqtool.patches.make_cache`); without it every step is a full
step (nothing can be recycled). Decode computes with ``kernels.decode_attn`` over the gathered keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from seqtool.errors import BadInputError
from seqtool.patches.base import AttentionMethod, AttnCall
from seqtool.patches.cache import SeqtoolCacheLayer
from seqtool.patches.registry import register_method
from seqtool.patches.selection import KeptSelection, Selection, TokenSelection


class _FullStep(KeptSelection):
    """A full step that also records the top-K keys of its last query for the next steps."""

    def __init__(self, call: AttnCall, method: "Recycled"):
        super().__init__(call.q.shape[0], call.q.shape[1], call.tq, call.tk, call.q.device)
        self._call, self._method = call, method

    def attend(self, q, k, v, scale):
        if self.tq > 16:
            out = self.dense_prefill(q, k, v, scale)
        else:
            out = super().attend(q, k, v, scale)
        self._method.record_topk(self._call)
        return out

    @staticmethod
    def dense_prefill(q, k, v, scale):
        from seqtool.patches.selection import dense_attention

        return dense_attention(q, k, v, scale)


@register_method
@dataclass
class Recycled(AttentionMethod):
    name: ClassVar[str] = "recycled"
    budget_units: ClassVar[str] = "K = tokens recycled from the last full step (stride S separate)"

    budget: float | str | None = 0.25
    stride: int = 16
    sim: float = 0.5

    def validate(self) -> None:
        if self.stride < 1:
            raise BadInputError("recycled needs stride >= 1")
        if not -1 <= self.sim <= 1:
            raise BadInputError(f"recycled sim is a cosine similarity in [-1, 1], got {self.sim}")

    def _needs_full(self, call: AttnCall, state: dict) -> bool:
        """A full step is due: every ``stride`` steps, or (``sim`` > -1) when the step's query drifted from the
        query of the last full step (mean cosine over heads, worst row, below ``sim``)."""
        if state["steps"] % self.stride == self.stride - 1:
            return True
        if self.sim > -1 and "q_full" in state:
            cos = torch.nn.functional.cosine_similarity(call.q[:, :, -1].float(), state["q_full"], dim=-1)
            return bool(cos.mean(1).min() < self.sim)
        return False

    def select(self, call: AttnCall) -> Selection:
        if call.cache is not None:
            call.cache.state[("recycled", call.key_offset)] = {"steps": 0}
            return _FullStep(call, self)
        return self.dense_selection(call)

    def select_decode(self, call: AttnCall) -> Selection:
        state = call.cache.state.get(("recycled", call.key_offset)) if call.cache is not None else None
        if state is None or "index" not in state or state["index"].shape[0] != call.q.shape[0] \
                or self._needs_full(call, state):
            if call.cache is not None:
                call.cache.state[("recycled", call.key_offset)] = {"steps": 0}
            return _FullStep(call, self) if call.cache is not None else \
                KeptSelection(call.q.shape[0], call.q.shape[1], call.tq, call.tk, call.q.device)
        state["steps"] += 1
        since = torch.arange(state["full_pos"] + 1, call.tk, device=call.q.device)
        index = torch.cat([state["index"], since.expand(*state["index"].shape[:2], -1)], -1)
        return TokenSelection(index, call.n_rep, call.tq, call.tk)

    def record_topk(self, call: AttnCall) -> None:
        """Top-K keys of the call's last query, per KV head, into the cache state."""
        b, hkv, tk = call.k.shape[0], call.k.shape[1], call.tk
        q = call.q[:, :, -1:].float().view(b, hkv, call.n_rep, -1)
        scores = torch.einsum("bgrd,bgkd->bgrk", q, call.k.float()) * call.scale
        mass = torch.softmax(scores, -1).sum(2)  # (b, Hkv, Tk)
        k_keep = self.budget_rule.tokens(tk)
        index = mass.topk(k_keep, -1).indices.sort(-1).values
        call.cache.state[("recycled", call.key_offset)].update(index=index, full_pos=tk - 1,
                                                              q_full=call.q[:, :, -1].float())

    def make_cache_layer(self, runtime: Any) -> SeqtoolCacheLayer:
        return RecycledCacheLayer(runtime)


class RecycledCacheLayer(SeqtoolCacheLayer):
    """Keeps the recycled top-K through ``generate``'s batch operations (beams, several return sequences): the
    rows' ``index`` / ``q_full`` follow the rows, so a reordered beam recycles its own top-K. An entry of a
    padding group smaller than the batch is dropped (the next step is then a full step: exact, only slower)."""

    _ROW_KEYS = ("index", "q_full")

    def _carry(self, op) -> dict:
        """The recycled entries covering every row, with ``op`` applied to their per-row tensors."""
        batch = self.keys.shape[0] if self.is_initialized and self.keys is not None else -1
        kept = {}
        for key, entry in self.state.items():
            if key[0] == "recycled" and all(entry[k].shape[0] == batch for k in self._ROW_KEYS if k in entry):
                kept[key] = {k: op(v) if k in self._ROW_KEYS else v for k, v in entry.items()}
        return kept

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        kept = self._carry(lambda t: t[indices.to(t.device)])
        super().batch_select_indices(indices)
        self.state = kept

    def batch_repeat_interleave(self, repeats: int) -> None:
        kept = self._carry(lambda t: t.repeat_interleave(repeats, 0))
        super().batch_repeat_interleave(repeats)
        self.state = kept

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        kept = self._carry(lambda t: t.index_select(0, beam_idx.to(t.device)))
        super().reorder_cache(beam_idx)
        self.state = kept
