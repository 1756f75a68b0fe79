"""``seqtool patch --report``: per layer and head, the dense attention mass a patch keeps and the work it does.

On a probe input (random tokens, seed fixed) the patched model runs once with selections recorded; for each
layer/head the dense attention probabilities (reference computation, probe-sized) are summed over the keys the
method selected. ``mass_kept`` is that share averaged over queries; ``keys_computed`` is kept / causal pairs, as
measured by the selection itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from seqtool.patches.runtime import apply_patch


@dataclass
class HeadReport:
    layer: int
    head: int
    method: str
    mass_kept: float
    keys_computed: float


@dataclass
class PatchReport:
    method: str
    spec: str
    probe_tokens: int
    min_len: int
    mass_kept: float
    keys_computed: float
    heads: list[HeadReport] = field(default_factory=list)


def _mass_per_head(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean over queries of the dense attention mass inside ``mask``: ``(B, Hq)``."""
    rep = q.shape[1] // k.shape[1]
    kk = k.float().repeat_interleave(rep, 1)
    scores = (q.float() @ kk.transpose(-1, -2)) * scale
    tq, tk = scores.shape[-2:]
    pos = torch.arange(tq, device=q.device) + (tk - tq)
    causal = torch.arange(tk, device=q.device)[None, :] <= pos[:, None]
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    return (probs * mask).sum(-1).mean(-1)


def patch_report(model: Any, method: str, options: dict[str, Any], *, probe_tokens: int = 512,
                 seed: int = 0) -> PatchReport:
    """Apply ``method`` to ``model``, run a probe, measure, and restore the model."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, max(4, vocab - 1), (1, probe_tokens), generator=gen).to(model.device)
    handle = apply_patch(model, method, **options)
    try:
        with handle.recording(capture_qk=True) as records, torch.no_grad():
            model(ids)
        heads = []
        for layer, recs in sorted(records.items()):
            rt = handle.runtimes[layer]
            rec = recs[0]  # one probe forward, one row: one call per layer
            mass = _mass_per_head(rec.q, rec.k, rec.selection.mask(), rec.scale).mean(0)
            per_head_total = rt.total_pairs / rt.n_heads
            for h in range(rt.n_heads):
                heads.append(HeadReport(layer, h, rt.method.name, float(mass[h]),
                                        float(rt.kept_pairs[h]) / per_head_total))
        n = len(heads)
        return PatchReport(method, handle.spec, probe_tokens, int(getattr(handle.runtimes[0].method, "min_len", 0)),
                           sum(h.mass_kept for h in heads) / n, handle.kept_fraction() or 1.0, heads)
    finally:
        handle.remove()
