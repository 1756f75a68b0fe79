"""What a method chose to compute, in a form tests and reports can check from outside.

Every selection describes one attention call on *unpadded* rows: queries ``(B, Hq, Tq, D)`` aligned to the end
of keys ``(B, Hkv, Tk, D)`` (query ``i`` sits at key position ``Tk - Tq + i``). It offers

- ``attend(q, k, v, scale)``: the sparse compute, through ``seqtool.kernels`` ops only;
- ``kept_pairs()``: ``(B, Hq)`` number of causal (query, key) pairs computed, counted without building a
  ``Tq x Tk`` tensor (this feeds the measured kept fraction in every report);
- ``mask()``: the same set as a dense boolean ``(B, Hq, Tq, Tk)`` mask, causal included. Reference/test use only:
  a dense attention masked with it must equal ``attend``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seqtool.patches import _ops as kernels


def causal_pairs(tq: int, tk: int) -> int:
    """Causal pairs for ``tq`` queries aligned to the end of ``tk`` keys."""
    first = tk - tq + 1
    return tq * first + tq * (tq - 1) // 2


def _span_pair_counts(tq: int, tk: int, q_block: int, k_block: int, device) -> torch.Tensor:
    """``(nq, nk)`` causal pairs between query block i and key block j (queries aligned to the key end).

    Closed form, O(nq * nk): query p sees min(p + 1, e) - s keys of key block [s, e) (clamped to [0, e - s]),
    and sum_{t=1..x} clamp(t - s, 0, e - s) = T(x - s) - T(x - e) with T(n) = n (n + 1) / 2 for n > 0.
    """
    def tri(n: torch.Tensor) -> torch.Tensor:
        n = n.clamp(min=0)
        return n * (n + 1) // 2

    nq = -(-tq // q_block)
    j = torch.arange(nq, device=device)
    first = (tk - tq) + j * q_block  # first query position of each block
    last = (tk - tq) + torch.clamp((j + 1) * q_block, max=tq) - 1
    s = torch.arange(0, tk, k_block, device=device)
    e = (s + k_block).clamp(max=tk)

    def upto(x: torch.Tensor) -> torch.Tensor:  # (nq, nk) pairs of the queries at positions < x
        return tri(x[:, None] - s[None, :]) - tri(x[:, None] - e[None, :])

    return upto(last + 1) - upto(first)


class Selection:
    """Base class; see the module docstring."""

    tq: int
    tk: int

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        raise NotImplementedError

    def kept_pairs(self) -> torch.Tensor:
        raise NotImplementedError

    def mask(self) -> torch.Tensor:
        raise NotImplementedError

    def _causal(self, device) -> torch.Tensor:
        pos = torch.arange(self.tq, device=device) + (self.tk - self.tq)
        return torch.arange(self.tk, device=device)[None, :] <= pos[:, None]


@dataclass
class DenseSelection(Selection):
    """Every causal key (the ``dense`` method and the ``min_len`` fallback)."""

    batch: int
    heads: int
    tq: int
    tk: int
    device: torch.device | str = "cpu"

    def attend(self, q, k, v, scale):
        return dense_attention(q, k, v, scale)

    def kept_pairs(self):
        return torch.full((self.batch, self.heads), float(causal_pairs(self.tq, self.tk)), device=self.device)

    def mask(self):
        return self._causal(self.device).expand(self.batch, self.heads, self.tq, self.tk)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention (queries end-aligned) with torch SDPA; GQA without repeating k/v. -> (B, Hq, Tq, D)."""
    tq, tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if tq == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    pos = torch.arange(tq, device=q.device) + (tk - tq)
    mask = torch.arange(tk, device=q.device)[None, :] <= pos[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


@dataclass
class BlockSelection(Selection):
    """Key blocks per query block: ``block_index (B, Hq, nq, max_k)`` int32 and ``block_count (B, Hq, nq)``.

    Computed with ``kernels.block_sparse_attn``; entries past ``block_count`` are ignored.
    """

    block_index: torch.Tensor
    block_count: torch.Tensor
    block_q: int
    block_k: int
    tq: int
    tk: int
    #: Optional RoPE re-encoding (LongHeads): position shift ``(B, Hq, nq, max_k)`` of each listed key block
    #: as seen by its query block, with the model's ``rope_inv_freq`` ``(R/2,)``.
    block_shift: torch.Tensor | None = None
    rope_inv_freq: torch.Tensor | None = None

    def attend(self, q, k, v, scale):
        return kernels.block_sparse_attn(q, k, v, self.block_index, self.block_count,
                                         block_q=self.block_q, block_k=self.block_k, scale=scale,
                                         block_shift=self.block_shift, rope_inv_freq=self.rope_inv_freq)

    def key_shift(self) -> torch.Tensor | None:
        """``(B, Hq, Tq, Tk)`` long position shift of each key as seen by each query (tests and references
        only; None without re-encoding)."""
        if self.block_shift is None:
            return None
        return self._to_tokens(self._per_block(self.block_shift.long()))

    def _valid(self) -> torch.Tensor:
        slots = torch.arange(self.block_index.shape[-1], device=self.block_index.device)
        return slots < self.block_count[..., None]

    def kept_pairs(self):
        counts = _span_pair_counts(self.tq, self.tk, self.block_q, self.block_k, self.block_index.device)
        b, h, nq, m = self.block_index.shape
        idx = self.block_index.long().clamp(0, counts.shape[1] - 1)
        per = counts[torch.arange(nq, device=idx.device)[None, None, :, None], idx]  # (B, H, nq, m)
        return (per * self._valid()).sum((-1, -2)).float()

    def _per_block(self, values: torch.Tensor) -> torch.Tensor:
        """Listed slots' ``values`` ``(B, Hq, nq, max_k)`` placed at their key block: ``(B, Hq, nq, nk)``, 0 elsewhere."""
        b, h, nq, _ = self.block_index.shape
        nk = -(-self.tk // self.block_k)
        out = torch.zeros(b, h, nq, nk + 1, dtype=values.dtype, device=self.block_index.device)
        valid = self._valid()
        out.scatter_(-1, torch.where(valid, self.block_index.long(), nk), values * valid)
        return out[..., :nk]

    def _to_tokens(self, per_block: torch.Tensor) -> torch.Tensor:
        """``(B, Hq, nq, nk)`` → ``(B, Hq, Tq, Tk)`` (each block entry repeated over its queries and keys)."""
        dense = per_block.repeat_interleave(self.block_q, 2)[:, :, : self.tq]
        return dense.repeat_interleave(self.block_k, 3)[..., : self.tk]

    def block_mask(self) -> torch.Tensor:
        """``(B, Hq, nq, nk)`` bool: which key blocks each query block computes."""
        return self._per_block(torch.ones_like(self.block_index, dtype=torch.bool))

    def mask(self):
        dense = self._to_tokens(self.block_mask())
        return dense & self._causal(dense.device)


@dataclass
class PageSelection(Selection):
    """Decode: KV pages per KV head, ``page_index (B, Hkv, max_pages)`` int32 and ``page_count (B, Hkv)``.

    Computed with ``kernels.decode_attn``; every query head of a KV group reads the same pages (GQA-native).
    """

    page_index: torch.Tensor
    page_count: torch.Tensor
    page_size: int
    n_rep: int
    tq: int
    tk: int

    def attend(self, q, k, v, scale):
        return kernels.decode_attn(q, k, v, page_index=self.page_index, page_count=self.page_count,
                                   page_size=self.page_size, scale=scale)

    def _as_blocks(self) -> BlockSelection:
        index = self.page_index.repeat_interleave(self.n_rep, 1)[:, :, None]
        count = self.page_count.repeat_interleave(self.n_rep, 1)[:, :, None]
        return BlockSelection(index, count, block_q=max(self.tq, 1), block_k=self.page_size, tq=self.tq, tk=self.tk)

    def kept_pairs(self):
        return self._as_blocks().kept_pairs()

    def mask(self):
        return self._as_blocks().mask()


@dataclass
class TokenSelection(Selection):
    """Decode: explicit key positions per KV head, ``index (B, Hkv, K)`` int64 (entries < 0 unused).

    The kept keys are gathered into a contiguous ``(B, Hkv, K, D)`` buffer and attended with
    ``kernels.decode_attn``; only keys at or before each query's position are used.
    """

    index: torch.Tensor
    n_rep: int
    tq: int
    tk: int

    def attend(self, q, k, v, scale):
        idx = self.index.clamp(min=0)
        gather = idx[..., None].expand(-1, -1, -1, k.shape[-1])
        kk, vv = torch.gather(k, 2, gather), torch.gather(v, 2, gather)
        if self.tq == 1 and bool((self.index >= 0).all()):
            return kernels.decode_attn(q, kk, vv, scale=scale)
        # Several queries or unused slots: per query, move its visible slots first and attend only those.
        return _gathered_attend(q, kk, vv, self.index, self.tk - self.tq, self.n_rep, scale)

    def _hits(self) -> torch.Tensor:
        pos = torch.arange(self.tq, device=self.index.device) + (self.tk - self.tq)
        return (self.index[:, :, None, :] >= 0) & (self.index[:, :, None, :] <= pos[:, None])  # (B, Hkv, tq, K)

    def kept_pairs(self):
        return self._hits().sum((-1, -2)).repeat_interleave(self.n_rep, 1).float()

    def mask(self):
        b, hkv, k = self.index.shape
        out = torch.zeros(b, hkv, self.tq, self.tk + 1, dtype=torch.bool, device=self.index.device)
        idx = torch.where(self._hits(), self.index[:, :, None, :], self.tk)
        out.scatter_(-1, idx, True)
        return out[..., : self.tk].repeat_interleave(self.n_rep, 1)


def _gathered_attend(q, kk, vv, index, first_pos, n_rep, scale):
    """Attend each query row separately over the gathered keys visible to it (queries <= 16, keys = K)."""
    outs = []
    for i in range(q.shape[2]):
        visible = (index >= 0) & (index <= first_pos + i)  # (B, Hkv, K)
        order = torch.argsort((~visible).to(torch.int8), dim=-1, stable=True)
        g = order[..., None].expand(-1, -1, -1, kk.shape[-1])
        k_i, v_i = torch.gather(kk, 2, g), torch.gather(vv, 2, g)
        n_vis = visible.sum(-1)  # (B, Hkv); equal across heads is not guaranteed, so loop over the rare ragged case
        if bool((n_vis == n_vis.flatten()[0]).all()):
            n = int(n_vis.flatten()[0])
            outs.append(kernels.decode_attn(q[:, :, i : i + 1], k_i[:, :, :n], v_i[:, :, :n], scale=scale))
        else:
            per_head = []
            for h in range(kk.shape[1]):
                rows = []
                for b in range(kk.shape[0]):
                    n = int(n_vis[b, h])
                    qh = q[b : b + 1, h * n_rep : (h + 1) * n_rep, i : i + 1]
                    rows.append(kernels.decode_attn(qh, k_i[b : b + 1, h : h + 1, :n], v_i[b : b + 1, h : h + 1, :n], scale=scale))
                per_head.append(torch.cat(rows, 0))
            outs.append(torch.cat(per_head, 1))
    return torch.cat(outs, 2)


@dataclass
class KeptSelection(Selection):
    """Every key the cache still holds (after the cache layer's eviction), computed with the kernels:
    ``decode_attn`` for decode-sized calls, ``block_sparse_attn`` over all causal blocks otherwise."""

    batch: int
    heads: int
    tq: int
    tk: int
    device: torch.device | str = "cpu"

    def attend(self, q, k, v, scale):
        if self.tq <= 16:
            return kernels.decode_attn(q, k, v, scale=scale)
        return full_blocks(self.batch, self.heads, self.tq, self.tk, 64, q.device).attend(q, k, v, scale)

    def kept_pairs(self):
        return torch.full((self.batch, self.heads), float(causal_pairs(self.tq, self.tk)), device=self.device)

    def mask(self):
        return self._causal(self.device).expand(self.batch, self.heads, self.tq, self.tk)


def full_blocks(batch: int, heads: int, tq: int, tk: int, block: int, device) -> "BlockSelection":
    """A BlockSelection listing every causal key block (what a method's full budget reduces to)."""
    nq, nk = -(-tq // block), -(-tk // block)
    last = (tk - tq + torch.clamp((torch.arange(nq, device=device) + 1) * block, max=tq) - 1) // block
    index = torch.arange(nk, device=device, dtype=torch.int32).expand(batch, heads, nq, nk).contiguous()
    count = (last + 1).to(torch.int32).expand(batch, heads, nq).contiguous()
    return BlockSelection(index, count, block, block, tq, tk)


@dataclass
class ColumnBlockSelection(BlockSelection):
    """Key blocks plus explicit key columns per query block (MInference vertical lines):
    ``column_index (B, Hq, nq, max_c)`` absolute key positions outside the listed blocks, ``column_count``."""

    column_index: torch.Tensor | None = None
    column_count: torch.Tensor | None = None

    def attend(self, q, k, v, scale):
        return kernels.block_sparse_attn(q, k, v, self.block_index, self.block_count, block_q=self.block_q,
                                         block_k=self.block_k, scale=scale, column_index=self.column_index,
                                         column_count=self.column_count)

    def _column_valid(self) -> torch.Tensor:
        slots = torch.arange(self.column_index.shape[-1], device=self.column_index.device)
        return slots < self.column_count[..., None]

    def kept_pairs(self):
        blocks = super().kept_pairs()
        nq = self.block_index.shape[2]
        j = torch.arange(nq, device=self.column_index.device)
        p0 = (self.tk - self.tq) + j * self.block_q
        p1 = (self.tk - self.tq) + torch.clamp((j + 1) * self.block_q, max=self.tq) - 1
        col = self.column_index.long()
        per = (p1[None, None, :, None] - torch.maximum(col, p0[None, None, :, None]) + 1).clamp(min=0)
        return blocks + (per * self._column_valid()).sum((-1, -2)).float()

    def mask(self):
        base = super().mask()
        b, h, nq, _ = self.column_index.shape
        cols = torch.zeros(b, h, nq, self.tk + 1, dtype=torch.bool, device=base.device)
        cols.scatter_(-1, torch.where(self._column_valid(), self.column_index.long(), self.tk), True)
        cols = cols[..., : self.tk].repeat_interleave(self.block_q, 2)[:, :, : self.tq]
        return base | (cols & self._causal(base.device))


@dataclass
class QuerySplitSelection(Selection):
    """Consecutive query ranges, each with its own selection over the keys up to its last query.

    ``parts``: ``[(q_start, q_end, selection)]`` covering ``[0, tq)`` in order; part ``p`` sees keys
    ``[0, tk - tq + q_end)`` (its queries stay end-aligned). Lets a block-granular method start a call in the
    middle of a key block (several queries after eviction) without widening any query's window.
    """

    parts: list
    tq: int
    tk: int

    def _keys(self, q_end: int) -> int:
        return self.tk - self.tq + q_end

    def attend(self, q, k, v, scale):
        outs = [sel.attend(q[:, :, a:b], k[:, :, :self._keys(b)], v[:, :, :self._keys(b)], scale)
                for a, b, sel in self.parts]
        return torch.cat(outs, 2)

    def kept_pairs(self):
        return sum(sel.kept_pairs() for _, _, sel in self.parts)

    def mask(self):
        masks = [F.pad(sel.mask(), (0, self.tk - self._keys(b))) for _, b, sel in self.parts]
        return torch.cat(masks, 2)
