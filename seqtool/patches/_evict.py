"""Per-head KV eviction shared by ``snapkv`` and ``h2o``: a cache layer that keeps a different set of tokens per
KV head, and the selection that attends what it kept while describing it in original positions.

Budget: ``tokens = budget.tokens(prompt length)`` KV entries per head and row (resolved once, at the first call,
against each row's own prompt), sinks and windows included; a budget at or above the prompt length never evicts
(exactly dense). Rows keep their tokens front-filled (``kv_start`` marks each row's first valid slot, as
:class:`~seqtool.patches.streaming.StreamingCacheLayer` does); kept slots stay in original order, so causality in
cache coordinates is causality in original positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from seqtool.patches import _ops as kernels
from seqtool.patches.cache import SeqtoolCacheLayer
from seqtool.patches.selection import Selection, causal_pairs, dense_attention, full_blocks


@dataclass
class EvictedSelection(Selection):
    """Attend every kept key of the call (``kernels.decode_attn`` for decode-sized calls, block-sparse over all
    blocks otherwise). ``positions`` ``(b, Hkv, Tk)``: original (row-relative) position of each kept key;
    ``total``: keys seen so far (evicted ones included). ``mask()`` is over the ``total`` original positions."""

    positions: torch.Tensor
    n_rep: int
    tq: int
    tk: int
    total: int

    def attend(self, q, k, v, scale):
        if self.tq <= 16:
            return kernels.decode_attn(q, k, v, scale=scale)
        return full_blocks(q.shape[0], q.shape[1], self.tq, self.tk, 64, q.device).attend(q, k, v, scale)

    def kept_pairs(self):
        b, hkv = self.positions.shape[:2]
        return torch.full((b, hkv * self.n_rep), float(causal_pairs(self.tq, self.tk)), device=self.positions.device)

    def mask(self):
        b, hkv, tk = self.positions.shape
        qpos = torch.arange(self.tq, device=self.positions.device) + (self.total - self.tq)
        out = torch.zeros(b, hkv, self.tq, self.total + 1, dtype=torch.bool, device=self.positions.device)
        pos = self.positions[:, :, None, :].expand(b, hkv, self.tq, tk)
        ok = (pos >= 0) & (pos <= qpos[:, None])
        out.scatter_(-1, torch.where(ok, pos, self.total), True)
        return out[..., : self.total].repeat_interleave(self.n_rep, 1)


class PrefillScored(Selection):
    """Dense prefill (SDPA) that hands the call to ``on_attend`` (the method scores the keys for eviction)."""

    def __init__(self, call: Any, on_attend):
        self.call, self.on_attend = call, on_attend
        self.tq, self.tk = call.tq, call.tk

    def attend(self, q, k, v, scale):
        out = dense_attention(q, k, v, scale)
        self.on_attend(self.call)
        return out

    def kept_pairs(self):
        b, hq = self.call.q.shape[:2]
        return torch.full((b, hq), float(causal_pairs(self.tq, self.tk)), device=self.call.q.device)

    def mask(self):
        return self._causal(self.call.q.device).expand(self.call.q.shape[0], self.call.q.shape[1], self.tq, self.tk)


def attention_mass(q: torch.Tensor, k: torch.Tensor, scale: float, n_rep: int, chunk: int = 256) -> torch.Tensor:
    """``(b, Hkv, Tk)``: causal softmax attention each key receives from the queries ``q`` ``(b, Hq, Tq, D)``
    (end-aligned to ``k`` ``(b, Hkv, Tk, D)``), summed over the queries and the query heads of each KV head.
    Chunked over queries: ``O(Tq * Tk)`` compute, ``O(chunk * Tk)`` memory."""
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    kf = k.float()
    acc = torch.zeros(b, hkv, tk, device=q.device)
    for s in range(0, tq, chunk):
        e = min(tq, s + chunk)
        qc = q[:, :, s:e].float().reshape(b, hkv, n_rep * (e - s), d)
        sc = (qc @ kf.transpose(-1, -2)).view(b, hkv, n_rep, e - s, tk) * scale
        pos = torch.arange(s, e, device=q.device) + (tk - tq)
        causal = torch.arange(tk, device=q.device)[None, :] <= pos[:, None]
        acc += torch.softmax(sc.masked_fill(~causal, float("-inf")), -1).sum((2, 3))
    return acc


class EvictingCacheLayer(SeqtoolCacheLayer):
    """Per-head eviction. State (leading batch dim): ``budget`` (kept tokens per head, -1 until resolved;
    ``1 << 40`` = never evict), ``origin`` (each row's first key in padded-batch positions), ``head_pos``
    ``(B, Hkv, L)`` padded-batch position of every slot per head, ``score`` ``(B, Hkv, L)`` a method's running
    per-slot score (h2o) or None. Subclasses call :meth:`evict_to` from ``after_attention``."""

    NEVER = 1 << 40

    def __init__(self, runtime: Any, method: Any):
        super().__init__(runtime)
        self.method = method
        self.budget: torch.Tensor | None = None
        self.origin: torch.Tensor | None = None
        self.head_pos: torch.Tensor | None = None
        self.score: torch.Tensor | None = None
        self.pending: list = []  # [(rows, key_offset, scores (b, Hkv, tk))] from this forward's prefill calls

    def update(self, key_states, value_states, *args, **kwargs):
        start = self.cumulative_length
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self.positions = None  # per-head positions live in head_pos
        b, h, t = key_states.shape[:3]
        new = torch.arange(start, start + t, device=key_states.device).expand(b, h, t)
        self.head_pos = new if self.head_pos is None else torch.cat([self.head_pos, new], 2)
        if self.score is not None:
            self.score = torch.cat([self.score, self.score.new_zeros(b, h, t)], 2)
        return keys, values

    # ---- what a call sees ---------------------------------------------------------------------------------
    def row_positions(self, rows: torch.Tensor, key_offset: int, tk: int) -> torch.Tensor:
        """Row-relative original positions ``(b, Hkv, tk)`` of the call's keys."""
        origin = self.origin[rows] if self.origin is not None else torch.full_like(rows, key_offset)
        return self.head_pos[rows, :, key_offset:key_offset + tk] - origin[:, None, None]

    def dropped(self, rows: torch.Tensor) -> int:
        if self.origin is None:
            return 0
        r = int(rows[0])
        kept = self.keys.shape[2] - int(self.kv_start[r]) if self.kv_start is not None else self.keys.shape[2]
        return int(self.seen[r]) - kept

    @property
    def seen(self) -> torch.Tensor:
        """(B,) valid tokens per row so far (evicted included)."""
        return self.cumulative_length - self.origin

    def resolve(self, kv_start: torch.Tensor, rule) -> None:
        """At the first call: each row's origin and budget (a ratio of its prompt length, or the token count
        itself, not capped at the prompt: a count above the prompt lets the cache grow to it)."""
        if self.origin is None:
            self.origin = kv_start.long().clone()
            lens = (self.keys.shape[2] - kv_start.long()).tolist()
            per_row = [self.NEVER if rule.is_full else int(rule.value) if rule.value >= 1 else rule.tokens(n)
                       for n in lens]
            self.budget = torch.tensor(per_row, dtype=torch.long, device=kv_start.device)

    # ---- eviction -------------------------------------------------------------------------------------------
    def evict_to(self, kv_start: torch.Tensor, keep_score: torch.Tensor, protect: torch.Tensor) -> None:
        """Keep per row and head its ``budget`` best slots by ``keep_score`` ``(B, Hkv, L)`` (slots before
        ``kv_start`` ignored, ``protect`` ``(B, Hkv, L)`` bool slots always kept). No-op where nothing exceeds."""
        b, h, length = keep_score.shape
        valid = torch.arange(length, device=keep_score.device)[None, :] >= kv_start[:, None].long()  # (B, L)
        n_valid = valid.sum(1)
        keep_n = torch.minimum(n_valid, self.budget.clamp(max=length))
        if bool((keep_n >= n_valid).all()):
            return
        width = int(keep_n.max())
        # Protected slots rank above every score, the latest first (a window longer than the budget keeps its end).
        later = 1e30 * (1 + torch.arange(length, device=keep_score.device, dtype=torch.float32) / length)
        rank = torch.where(protect, later, keep_score.float()).masked_fill(~valid[:, None], float("-inf"))
        # Stable: equal scores (max-pool plateaus) keep the earlier slot, the same in a padded batch as alone.
        top = torch.sort(rank, dim=-1, descending=True, stable=True).indices[..., :width]  # (B, H, width)
        slot = torch.arange(width, device=top.device)
        # Rows keeping fewer than `width`: their last (worst) picks become front-fill slots.
        fill = slot[None, :] >= keep_n[:, None]  # (B, width)
        top = torch.where(fill[:, None], -1, top)
        ordered = torch.sort(torch.where(top >= 0, top, -1), -1).values  # front-fill (-1) first, then ascending
        index = ordered.clamp(min=0)
        gather = index[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        before = self.keys.shape[2]
        self.keys = torch.gather(self.keys, 2, gather)
        self.values = torch.gather(self.values, 2, gather)
        self.head_pos = torch.gather(self.head_pos, 2, index)
        if self.score is not None:
            self.score = torch.gather(self.score, 2, index)
        self.kv_start = width - keep_n
        self.evicted_tokens += before - width
        self.state = {}

    # ---- batch bookkeeping ----------------------------------------------------------------------------------
    _ROW_STATE = ("budget", "origin", "head_pos", "score")

    def reset(self) -> None:
        super().reset()
        self.budget = self.origin = self.head_pos = self.score = None
        self.pending = []

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        for name in self._ROW_STATE:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        for name in self._ROW_STATE:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.repeat_interleave(repeats, 0))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for name in self._ROW_STATE:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, beam_idx.to(t.device)))
