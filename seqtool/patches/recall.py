"""Attention recall: the share of the dense attention mass a patch's selection kept, per layer and head.

For every query a method computes, recall = sum of the *dense* softmax probabilities (over every causal key of
the sequence, evicted ones included) at the keys the selection attended. 1.0 means the selection lost nothing;
a low recall on the queries that produce an answer at a large budget means the selection misses what the model
needs (a selection bug, or a method that cannot see the needle).

:class:`RecallMeter` observes a patched model (``with RecallMeter(handle) as meter: ...``): every method call
reports its selection; the meter keeps a shadow of every key the layer has seen (so eviction does not hide what
was dropped) and accumulates per-query recall per layer, head and *phase* (``meter.phase``, set by the driver:
e.g. ``"prefill"``, ``"tail"``, ``"answer"``). Evicting caches map their slots back to original positions through
:attr:`~seqtool.patches.cache.SeqtoolCacheLayer.positions`; a cache that stores only part of the heads (razor's
split cache) cannot be mapped and is skipped (use ``evict=false``: same selection, full KV).
Cost: a dense ``Tq x Tk`` score matrix per call, computed in query chunks — diagnostics only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK = 256


def recall_per_query(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float,
                     chunk: int = CHUNK) -> torch.Tensor:
    """``q`` ``(B, Hq, Tq, D)``, ``k`` ``(B, Hkv, Tk, D)`` (queries end-aligned), ``mask`` ``(B, Hq, Tq, Tk)``
    bool → ``(B, Hq, Tq)`` fp32: dense causal attention mass inside ``mask`` per query."""
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    kf = k.float()
    out = []
    for s in range(0, tq, chunk):
        e = min(tq, s + chunk)
        qc = q[:, :, s:e].float().reshape(b, hkv, g * (e - s), d)
        sc = (qc @ kf.transpose(-1, -2)).view(b, hq, e - s, tk) * scale
        pos = torch.arange(s, e, device=q.device) + (tk - tq)
        causal = torch.arange(tk, device=q.device)[None, :] <= pos[:, None]
        probs = torch.softmax(sc.masked_fill(~causal, float("-inf")), -1)
        # 1 - the mass outside the selection: a selection of every causal key gives exactly 1.0
        out.append(1.0 - (probs * (~mask[:, :, s:e] & causal)).sum(-1))
    return torch.cat(out, 2)


@dataclass
class _Shadow:
    keys: torch.Tensor  # (b, Hkv, T, D): every key of the group so far, original order
    start: int  # batch-coordinate position of the group's key 0 (its left padding)


class RecallMeter:
    """Accumulates attention recall of a patched model; see the module docstring."""

    def __init__(self, handle, chunk: int = CHUNK, phases: tuple[str, ...] | None = None):
        from seqtool.arch.registry import head_counts

        self.handle = handle
        self.chunk = chunk
        self.n_heads, self.n_kv, _ = head_counts(handle.model.config)
        self.phase = "prefill"
        #: Phases to measure (None: all). Keys are shadowed in every phase (eviction needs the full history).
        self.measure = phases
        self.sums: dict[tuple[int, str], torch.Tensor] = {}  # (layer, phase) -> (Hq,) sum of per-query recall
        self.counts: dict[tuple[int, str], int] = {}  # (layer, phase) -> queries (per head)
        self.skipped = 0
        self._shadow: dict[tuple[int, tuple[int, ...]], _Shadow] = {}

    def set_phase(self, name: str) -> None:
        self.phase = name

    def __enter__(self) -> "RecallMeter":
        for rt in self.handle.runtimes.values():
            rt.meter = self
        return self

    def __exit__(self, *exc) -> None:
        for rt in self.handle.runtimes.values():
            rt.meter = None
        self._shadow.clear()

    # ---- observation (called by the runtime after each method call) ------------------------------------------
    def observe(self, layer: int, call, selection) -> None:
        if call.k.shape[1] != self.n_kv:  # a cache that hands attention only some heads (razor's split cache)
            self.skipped += 1
            return
        rows = tuple(call.rows.tolist())
        key = (layer, rows)
        cache = call.cache
        evicted = cache is not None and cache.evicted_tokens > 0
        shadow = self._shadow.get(key)
        if call.tk == call.tq or shadow is None:
            if evicted:
                self.skipped += 1
                return
            shadow = _Shadow(call.k, call.key_offset)
        else:
            shadow = _Shadow(torch.cat([shadow.keys, call.k[:, :, -call.tq:]], 2), shadow.start)
        self._shadow[key] = shadow
        if self.measure is not None and self.phase not in self.measure:
            return
        mask = selection.mask()
        if mask.shape[-1] != shadow.keys.shape[2]:  # a mask over the kept slots (eviction): map it back
            mask = self._to_original(mask, cache, call, shadow)
            if mask is None:
                self.skipped += 1
                return
        rec = recall_per_query(call.q, shadow.keys, mask, call.scale, self.chunk)  # (b, Hq, tq)
        k = (layer, self.phase)
        self.sums[k] = self.sums.get(k, 0) + rec.sum((0, 2)).double().cpu()
        self.counts[k] = self.counts.get(k, 0) + rec.shape[0] * rec.shape[2]

    @staticmethod
    def _to_original(mask, cache, call, shadow) -> torch.Tensor | None:
        """Selection mask over the call's (kept) keys → over every key the group has seen."""
        positions = getattr(cache, "positions", None)
        if positions is None:
            return None
        slots = positions[call.rows, call.key_offset:call.key_offset + call.tk] - shadow.start  # (b, tk)
        total = shadow.keys.shape[2]
        if bool((slots < 0).any()) or bool((slots >= total).any()):
            return None
        b, h, tq, _ = mask.shape
        out = torch.zeros(b, h, tq, total, dtype=torch.bool, device=mask.device)
        out.scatter_(-1, slots[:, None, None, :].expand(b, h, tq, -1).to(mask.device), mask)
        return out

    # ---- results -----------------------------------------------------------------------------------------------
    def phases(self) -> list[str]:
        return sorted({p for _, p in self.counts})

    def per_head(self, phases: str | tuple[str, ...] | None = None) -> torch.Tensor:
        """``(n_layers, Hq)`` mean recall over the queries of ``phases`` (all phases when None); NaN where the
        layer saw no such query."""
        if isinstance(phases, str):
            phases = (phases,)
        layers = sorted(self.handle.runtimes)
        out = torch.full((len(layers), self.n_heads), float("nan"), dtype=torch.float64)
        for i, layer in enumerate(layers):
            keys = [(layer, p) for p in (phases or self.phases()) if (layer, p) in self.counts]
            n = sum(self.counts[k] for k in keys)
            if n:
                out[i] = sum(self.sums[k] for k in keys) / n
        return out

    def mean(self, phases: str | tuple[str, ...] | None = None) -> float:
        """Mean recall over layers, heads and the queries of ``phases`` (NaN if none was seen)."""
        ph = self.per_head(phases)
        ok = ~torch.isnan(ph)
        return float(ph[ok].mean()) if bool(ok.any()) else float("nan")
