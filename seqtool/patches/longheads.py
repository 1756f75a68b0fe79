"""LongHeads: every query head picks the context chunks it attends, within the trained length.

Chunks are ``block_size`` keys. A finished chunk gets a *chunk key*: its queries attend (non-causally) over the
chunk's own keys; the mean of those outputs, over the chunk's queries and the query heads of the KV group, is a
summary vector that attends the chunk's keys once more, and the resulting softmax-weighted mean key represents the
chunk (LongHeads' chunk representation; the cache layer keeps chunk keys and the open chunk's queries, see
:mod:`seqtool.patches._units`). Each query head scores the middle chunks by ``sum(q over the query block) · chunk
key`` and keeps the best, always with the first chunk and the ``local_blocks`` chunks ending at the query block.

Scoring frame (``score``): ``chunk`` (default, as the official code): the chunk's keys sit at chunk-local
positions ``0..block_size-1`` when the summary weighs them and in the chunk key, and the query is scored before
RoPE (so a chunk's score does not depend on its distance to the query); ``absolute``: keys and queries at their
original positions (this module before the comparison with the official code, issue 17). Needs the model's RoPE
frequencies (``prepare``); without them (a model without RoPE, bare tensors) ``chunk`` scores as ``absolute``.
Prefill sums the query block's queries (the official code scores each query alone); decode scores each query.

Budget → units: the budget (key positions per query, resolved at each query block's last query) is rounded up to
whole chunks, first + local chunks included; ``trained_len`` (0 = off) caps the kept positions per query so each
head attends at most the model's trained length.

Positions (``reencode=true``, the default, as in LongHeads): a query block sees its selected chunks packed next to
each other, ending at its own chunk, so every relative distance stays within the kept span (at most the budget,
or ``trained_len``) however long the input. RoPE is already applied to the keys the attention receives, and
rotations compose, so each selected chunk's keys are rotated by its shift (packed start - original start) for
that query block (``kernels.block_sparse_attn(block_shift=...)``); chunks already contiguous with the query
block keep shift 0, so a full budget is exactly dense attention. ``reencode=false`` keeps the original positions.
The model's RoPE frequencies are read from its rotary module when the patch is applied (``prepare``, called by
``apply_patch``; a method object used on bare tensors without it keeps the original positions; models without
RoPE need ``reencode=false``). Prefill and decode run ``kernels.block_sparse_attn`` (:class:`BlockSelection`, per
query head).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from seqtool.errors import BadInputError, UnsupportedModelError
from seqtool.kernels._common import rope_rotate
from seqtool.patches._blocks import assemble, plan_blocks, query_blocks, topk_middle
from seqtool.patches._units import unit_reps
from seqtool.patches.base import AttentionMethod, AttnCall
from seqtool.patches.cache import SeqtoolCacheLayer
from seqtool.patches.registry import register_method
from seqtool.patches.selection import BlockSelection, Selection


def chunk_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, first: int = 0,
               inv_freq: torch.Tensor | None = None) -> torch.Tensor:
    """``q`` ``(b, Hkv, g, n, U, D)``, ``k``/``v`` ``(b, Hkv, n, U, D)`` → chunk keys ``(b, Hkv, n, D)``.

    With ``inv_freq`` (RoPE frequencies) the keys of chunk ``first + i`` are moved to chunk-local positions
    ``0..U-1`` before the summary weighs them (the official code's frame); the within-chunk attention is
    unchanged by it (rotations cancel). Within-chunk attention costs ``U^2`` per chunk (linear in the sequence
    length)."""
    probs = torch.softmax(torch.einsum("bhgnud,bhnwd->bhgnuw", q, k) * scale, -1)
    summary = torch.einsum("bhgnuw,bhnwd->bhnd", probs, v) / (q.shape[2] * q.shape[4])
    if inv_freq is not None:
        n, u = k.shape[2], k.shape[3]
        shift = -(first + torch.arange(n, device=k.device)) * u
        k = rope_rotate(k, shift[:, None].expand(k.shape[:-1]), inv_freq)
    weights = torch.softmax(torch.einsum("bhnd,bhnwd->bhnw", summary, k) * scale, -1)
    return torch.einsum("bhnw,bhnwd->bhnd", weights, k)


def packed_shift(index: torch.Tensor, count: torch.Tensor, block_size: int) -> torch.Tensor:
    """Position shift ``(B, H, nq, M)`` int32 that packs each query block's selected chunks contiguously.

    ``index`` ``(B, H, nq, M)`` ascending chunk ids (first ``count`` valid): slot ``i`` of ``n`` moves to chunk
    ``last - (n - 1 - i)`` where ``last`` is the query block's own (last) chunk, i.e. shift
    ``(last - (n - 1 - i) - index_i) * block_size``; contiguous trailing chunks get 0, unused slots 0.
    """
    slot = torch.arange(index.shape[-1], device=index.device)
    n = count.long()[..., None]
    last = index.long().gather(-1, (n - 1).clamp(min=0))
    shift = (last - (n - 1 - slot) - index.long()) * block_size
    return torch.where(slot < n, shift, 0).to(torch.int32)


@register_method
@dataclass
class LongHeadsMethod(AttentionMethod):
    """LongHeads chunk selection per head; see the module docstring."""

    name = "longheads"
    budget_units = ("chunks of block_size tokens per query block and head (first + local chunks included), capped "
                    "at trained_len positions")

    block_size: int = 64
    sink_blocks: int = 1
    local_blocks: int = 2
    trained_len: int = 0
    reencode: bool = True
    score: str = "chunk"

    def validate(self) -> None:
        if self.block_size < 1 or self.sink_blocks < 0 or self.local_blocks < 1 or self.trained_len < 0:
            raise BadInputError("longheads needs block_size >= 1, sink_blocks >= 0, local_blocks >= 1, "
                                "trained_len >= 0")
        if self.score not in ("chunk", "absolute"):
            raise BadInputError(f"longheads score must be chunk or absolute, got {self.score!r}")

    def prepare(self, model: nn.Module) -> None:
        """Find the model's rotary module (its ``inv_freq`` is read at each call: dynamic RoPE may change it)."""
        self._rotary = None
        for module in model.modules():
            if isinstance(getattr(module, "inv_freq", None), torch.Tensor):
                self._rotary = module
                return
        if self.reencode:
            raise UnsupportedModelError("longheads re-encodes RoPE positions but this model has no rotary "
                                        "embedding; pass reencode=false")

    def _inv_freq(self) -> torch.Tensor | None:
        rotary = getattr(self, "_rotary", None)
        return None if rotary is None else rotary.inv_freq.float()

    def _select(self, call: AttnCall, bq: int) -> BlockSelection:
        b, hq, tq, d = call.q.shape
        hkv = call.k.shape[1]
        inv_freq = self._inv_freq()
        local = inv_freq.to(call.q.device) if self.score == "chunk" and inv_freq is not None else None
        u = self.block_size

        def reps(q, k, v, scale):  # the new chunks are the last k.shape[2] finished ones
            return chunk_keys(q, k, v, scale, call.tk // u - k.shape[2], local)

        keys = unit_reps(call, u, reps, f"{self.name}:{self.score if local is not None else 'absolute'}")
        plan = plan_blocks(tq, call.tk, bq, u, self.budget_rule, self.sink_blocks, self.local_blocks,
                           call.q.device, max_tokens=self.trained_len or None)
        q = call.q.float()
        if local is not None:  # the official code scores with the query before RoPE
            pos = torch.arange(call.tk - tq, call.tk, device=q.device)
            q = rope_rotate(q, -pos.expand(q.shape[:-1]), local)
        qb, _ = query_blocks(q, bq)
        qsum = qb.sum(3).reshape(b, hkv, hq // hkv, plan.nq, d)
        sc = torch.einsum("bhgqd,bhud->bhgqu", qsum, keys).reshape(b, hq, plan.nq, -1)
        missing = plan.nk - sc.shape[-1]
        if missing:
            sc = torch.nn.functional.pad(sc, (0, missing), value=float("-inf"))
        index, count = assemble(plan, topk_middle(plan, sc))
        if not self.reencode or inv_freq is None:
            return BlockSelection(index, count, bq, self.block_size, tq, call.tk)
        return BlockSelection(index, count, bq, self.block_size, tq, call.tk,
                              block_shift=packed_shift(index, count, self.block_size),
                              rope_inv_freq=inv_freq.to(call.q.device))

    def select(self, call: AttnCall) -> Selection:
        return self._select(call, self.block_size)

    def select_decode(self, call: AttnCall) -> Selection:
        return self._select(call, call.tq)

    def make_cache_layer(self, runtime: Any) -> SeqtoolCacheLayer:
        return SeqtoolCacheLayer(runtime)  # chunk keys + the open chunk's queries live in ``state``
