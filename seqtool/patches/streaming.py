"""``streaming``: attention sinks + sliding window (StreamingLLM / MInference "A-shape"), block-granular.

Selection: query block ``i`` (block = ``block`` tokens) attends the first ``sink_blocks`` key blocks and the
``n_local`` key blocks ending at its own block. Budget → units: ``tokens = budget.tokens(Tk)`` (``Tk``: keys of the
call, i.e. the prompt length at prefill), ``n_local = max(1, ceil(tokens / block) - sink_blocks)``; so the window
is fixed per call, not per query. With ``evict=True`` and :func:`~seqtool.patches.make_cache`, the cache layer
keeps only the sink blocks and the current window after every step (KV really shrinks), resolving the budget
once at prefill; decode then attends every kept key. Because blocks are whole, prefill, decode and a full
forward select exactly the same keys.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from seqtool.errors import BadInputError
from seqtool.patches.base import AttentionMethod, AttnCall
from seqtool.patches.cache import SeqtoolCacheLayer
from seqtool.patches.registry import register_method
from seqtool.patches.selection import BlockSelection, KeptSelection, QuerySplitSelection, Selection


@register_method
@dataclass
class Streaming(AttentionMethod):
    name: ClassVar[str] = "streaming"
    budget_units: ClassVar[str] = "sink blocks + ceil(tokens/block) - sink_blocks local blocks"

    budget: float | str | None = 0.25
    block: int = 64
    sink_blocks: int = 1
    evict: bool = True

    def validate(self) -> None:
        if self.block < 1 or self.sink_blocks < 0:
            raise BadInputError("streaming needs block >= 1 and sink_blocks >= 0")

    def n_local(self, tk: int) -> int:
        if self.budget_rule.is_full:
            return 1 << 40  # every block, now and for any later length: never evict
        return max(1, math.ceil(self.budget_rule.tokens(tk) / self.block) - self.sink_blocks)

    def select(self, call: AttnCall) -> Selection:
        cache = call.cache
        if isinstance(cache, StreamingCacheLayer) and cache.n_local is not None:
            return self.blocks_after(call, cache.n_local)
        return self.blocks(call, self.n_local(call.tk))

    def blocks_after(self, call: AttnCall, n_local: int) -> Selection:
        """Several queries continuing a cached sequence (chunked prefill, speculative decode), maybe after
        eviction. Kept keys are block-aligned with the original positions (sinks are whole blocks, the window
        starts on a block boundary), so block selection in cache coordinates picks exactly the keys a full
        forward would; queries up to the next block boundary form their own part so no query block straddles
        two key blocks."""
        head = min(call.tq, (-(call.tk - call.tq)) % self.block)
        if head == 0 or head == call.tq:
            return self.blocks(call, n_local)
        split = call.tk - call.tq + head
        first = dataclasses.replace(call, q=call.q[:, :, :head], k=call.k[:, :, :split], v=call.v[:, :, :split])
        rest = dataclasses.replace(call, q=call.q[:, :, head:])
        parts = [(0, head, self.blocks(first, n_local)), (head, call.tq, self.blocks(rest, n_local))]
        return QuerySplitSelection(parts, call.tq, call.tk)

    def select_decode(self, call: AttnCall) -> Selection:
        cache = call.cache
        if isinstance(cache, StreamingCacheLayer) and cache.n_local is not None and call.tq == 1:
            # The cache layer evicted everything outside sinks + window of this query after the last step.
            return KeptSelection(call.q.shape[0], call.q.shape[1], call.tq, call.tk, call.q.device)
        return self.select(call)

    def blocks(self, call: AttnCall, n_local: int) -> BlockSelection:
        b, hq = call.q.shape[:2]
        bs, dev = self.block, call.q.device
        nq = -(-call.tq // bs)
        off = call.tk - call.tq
        j = torch.arange(nq, device=dev)
        kb0 = (off + j * bs) // bs
        kb1 = (off + torch.clamp((j + 1) * bs, max=call.tq) - 1) // bs
        n_local = min(n_local, -(-call.tk // bs))
        width = self.sink_blocks + n_local + 1
        slots = torch.arange(width, device=dev)
        local_first = (kb0 - n_local + 1).clamp(min=0)
        # Sinks first, then the window; the window starts after the sinks so no block is listed twice.
        win_first = torch.maximum(local_first, torch.full_like(local_first, self.sink_blocks))
        n_sink = torch.clamp(kb1 + 1, max=self.sink_blocks)
        n_win = (kb1 - win_first + 1).clamp(min=0)
        idx = torch.where(slots[None, :] < n_sink[:, None], slots[None, :],
                          win_first[:, None] + slots[None, :] - n_sink[:, None])
        count = n_sink + n_win
        idx = torch.where(slots[None, :] < count[:, None], idx, 0).to(torch.int32)
        return BlockSelection(idx.expand(b, hq, nq, width).contiguous(),
                              count.to(torch.int32).expand(b, hq, nq).contiguous(), bs, bs, call.tq, call.tk)

    def make_cache_layer(self, runtime: Any) -> SeqtoolCacheLayer | None:
        return StreamingCacheLayer(runtime, self) if self.evict else None


class StreamingCacheLayer(SeqtoolCacheLayer):
    """Keeps, per row, the sink blocks and the window blocks the next query needs; drops the rest.

    Rows are block-aligned from their first valid token. Rows keeping fewer tokens than the longest row are
    front-filled (``kv_start`` marks where their valid keys begin). Per-row state: ``seen`` (valid tokens so
    far) and ``window_start`` (row-relative position of the first kept window token).
    """

    def __init__(self, runtime: Any, method: Streaming):
        super().__init__(runtime)
        self.method = method
        self.n_local: int | None = None
        self.seen: torch.Tensor | None = None
        self.window_start: torch.Tensor | None = None
        self._last_total = 0

    def after_attention(self, kv_start: torch.Tensor) -> None:
        m = self.method
        sink = m.sink_blocks * m.block
        total = self.keys.shape[2]
        new = self.cumulative_length - self._last_total
        self._last_total = self.cumulative_length
        if self.n_local is None:
            self.n_local = m.n_local(int((total - kv_start).max()))
        if self.seen is None:
            self.seen = (total - kv_start).long()
            self.window_start = torch.full_like(self.seen, sink)
        else:
            self.seen = self.seen + new
        next_block = self.seen // m.block
        keep_from = torch.maximum((next_block - self.n_local + 1) * m.block, torch.full_like(self.seen, sink))
        n_sink = torch.clamp(self.seen, max=sink)
        kept = n_sink + (self.seen - keep_from).clamp(min=0)
        if bool((keep_from <= self.window_start).all()):
            return  # keep_from only grows: nothing new falls out of the window
        width = int(kept.max())
        rows = []
        for r in range(kv_start.shape[0]):
            s, ns = int(kv_start[r]), int(n_sink[r])
            sinks = s + torch.arange(ns, device=self.keys.device)
            window = s + sink + torch.arange(int(keep_from[r]), int(self.seen[r]), device=self.keys.device) \
                - int(self.window_start[r])
            idx = torch.cat([sinks, window])
            rows.append(torch.cat([idx.new_zeros(width - idx.numel()), idx]))
        index = torch.stack(rows)
        self.keep(index, width - kept)
        self.window_start = torch.maximum(keep_from, self.window_start)

    def dropped(self, rows: torch.Tensor) -> int:
        if self.window_start is None:
            return 0
        return int(self.window_start[rows].max()) - self.method.sink_blocks * self.method.block

    def reset(self) -> None:
        super().reset()
        self.n_local = self.seen = self.window_start = None
        self._last_total = 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.seen is not None:
            self.seen, self.window_start = self.seen[indices], self.window_start[indices]
