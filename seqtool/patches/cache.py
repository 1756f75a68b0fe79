"""Cache layers for methods that keep per-layer state across decode steps or evict KV.

The attention function cannot shrink the cache: the model layer writes k/v into the cache before calling it.
So a stateful method gives :func:`seqtool.patches.make_cache` a :class:`SeqtoolCacheLayer` subclass, which

- on ``update`` appends k/v like ``DynamicLayer`` and tells the layer's runtime "I am this call's cache", so the
  attention function can reach the state (``call.cache``);
- after attention, gets :meth:`SeqtoolCacheLayer.after_attention` and may evict (really shrinking ``keys`` /
  ``values``); it then tracks per-row ``kv_start`` in its own (kept) coordinates so padded batches stay right;
- reports the total tokens seen as its sequence length (positions keep counting after eviction) and the kept
  length through ``get_mask_sizes``.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from seqtool.errors import NotImplementedMethodError


class SeqtoolCacheLayer(DynamicLayer):
    """A DynamicLayer that links itself to the patch runtime and supports eviction.

    Subclasses keep extra per-row state as tensors with a leading batch dim (or lists indexed by row) and may
    override :meth:`after_attention` to evict via :meth:`keep`.
    """

    def __init__(self, runtime: Any = None):
        super().__init__()
        self.runtime = runtime
        self.cumulative_length = 0
        #: (B,) long, first valid key per row in kept coordinates; None until the first eviction (then the
        #: attention mask's left padding is used directly).
        self.kv_start: torch.Tensor | None = None
        self.evicted_tokens = 0
        #: Free-form per-layer method state (Quest page bounds, Recycled top-K ...). Key it by
        #: ``call.key_offset`` so rows with different padding keep separate entries; cleared on batch changes.
        self.state: dict = {}
        #: (B, L) long: original position (padded-batch coordinates, counting every token seen) of each kept
        #: slot; follows eviction (:meth:`keep`) so diagnostics can map a selection back (``recall``).
        self.positions: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states)
        t = key_states.shape[-2]
        new = torch.arange(self.cumulative_length, self.cumulative_length + t, device=key_states.device)
        new = new.expand(key_states.shape[0], t)
        self.positions = new if self.positions is None else torch.cat([self.positions, new], 1)
        self.cumulative_length += t
        if self.runtime is not None:
            self.runtime.pending_cache = self
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def kept_length(self) -> int:
        return 0 if not self.is_initialized or self.keys is None else self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = self.kept_length()
        return kept + query_length, self.cumulative_length - kept

    def map_kv_start(self, pads: torch.Tensor) -> torch.Tensor:
        """Left padding from the mask (original coordinates) → first valid key in cache coordinates."""
        return pads if self.kv_start is None else self.kv_start

    def dropped(self, rows: torch.Tensor) -> int:
        """Tokens of ``rows`` (a group sharing ``kv_start``) evicted so far: the kept fraction in reports is
        measured against the real causal context, not the kept cache."""
        return 0

    def after_attention(self, kv_start: torch.Tensor) -> None:
        """Called once per forward, after attention of this layer; ``kv_start`` (B,) in cache coordinates."""

    def keep(self, index: torch.Tensor, kv_start: torch.Tensor) -> None:
        """Keep only key slots ``index`` ``(B, L)`` (ascending per row); ``kv_start`` (B,) in the new coordinates."""
        gather = index[:, None, :, None].expand(-1, self.keys.shape[1], -1, self.keys.shape[-1])
        before = self.keys.shape[-2]
        self.keys = torch.gather(self.keys, 2, gather)
        self.values = torch.gather(self.values, 2, gather)
        self.kv_start = kv_start
        self.evicted_tokens += before - self.keys.shape[-2]
        if self.positions is not None:
            self.positions = torch.gather(self.positions, 1, index)

    def reset(self) -> None:
        super().reset()
        self.kv_start = None
        self.evicted_tokens = 0
        self.state = {}
        self.positions = None

    def crop(self, tokens_to_remove: int) -> None:
        if self.evicted_tokens:
            raise NotImplementedMethodError("cannot crop a cache after eviction; regenerate from the prompt instead")
        super().crop(tokens_to_remove)
        self.cumulative_length = self.kept_length()
        self.state = {}
        if self.positions is not None:
            self.positions = self.positions[:, : self.cumulative_length]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.state = {}
        if self.kv_start is not None:
            self.kv_start = self.kv_start[indices]
        if self.positions is not None:
            self.positions = self.positions[indices]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.state = {}
        if self.kv_start is not None:
            self.kv_start = self.kv_start.repeat_interleave(repeats, 0)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, 0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.state = {}
        if self.kv_start is not None:
            self.kv_start = self.kv_start.index_select(0, beam_idx.to(self.kv_start.device))
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))
