"""Incremental per-unit representatives (InfLLM memory units, LongHeads chunk keys).

A *unit* is a block of ``unit`` consecutive keys. Its representative is a function of the unit's keys, values and
the queries at the unit's own positions, so it can be computed once, when the unit's last token has arrived.
During decode those queries arrived one step at a time: the seqtool cache layer (``call.cache.state``) keeps the
representatives of finished units and the queries of the open (unfinished) unit, so prefill + cached decode builds
exactly the representatives a full forward builds. Without a seqtool cache the call's own queries are used; units
whose queries were never seen (a plain ``DynamicCache`` in decode) fall back to the mean of their keys.
"""
from __future__ import annotations

from typing import Callable

import torch

#: ``fn(q (b, Hkv, g, n, U, D), k (b, Hkv, n, U, D), v (b, Hkv, n, U, D), scale) -> (b, Hkv, n, D)``
ReprFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def unit_reps(call, unit: int, fn: ReprFn, tag: str) -> torch.Tensor:
    """Representatives ``(b, Hkv, tk // unit, D)`` (fp32) of every finished unit of ``call``'s keys."""
    q, k, v = call.q, call.k, call.v
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    prev_end = tk - tq
    cache = call.cache
    key = (tag, call.key_offset)
    st = cache.state.get(key) if cache is not None else None
    if st is not None and (st["end"] != prev_end or st["reps"].shape[0] != b):
        st = None  # stale (e.g. a dense min_len call in between): rebuild from what this call can see
    if st is not None:
        reps, n_done, q_open = st["reps"], st["n_done"], st["q_open"]
    else:
        n_done = prev_end // unit
        reps = k[:, :, : n_done * unit].float().reshape(b, hkv, n_done, unit, d).mean(3)
        # Queries of the open unit before this call were never seen here: they contribute nothing.
        q_open = q.new_zeros(b, hq, prev_end - n_done * unit, d)
    q_region = torch.cat([q_open, q], 2)  # queries at positions [n_done * unit, tk)
    n_total = tk // unit
    n_new = n_total - n_done
    if n_new > 0:
        lo, hi = n_done * unit, n_total * unit
        qc = q_region[:, :, : n_new * unit].float().reshape(b, hkv, g, n_new, unit, d)
        kc = k[:, :, lo:hi].float().reshape(b, hkv, n_new, unit, d)
        vc = v[:, :, lo:hi].float().reshape(b, hkv, n_new, unit, d)
        reps = torch.cat([reps, fn(qc, kc, vc, call.scale)], 2)
    if cache is not None:
        cache.state[key] = {"reps": reps, "n_done": n_total, "q_open": q_region[:, :, n_new * unit :].detach(),
                            "end": tk}
    return reps
