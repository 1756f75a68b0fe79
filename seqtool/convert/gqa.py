"""``convert --to gqa``: fewer KV heads by pooling groups of K/V heads (MHA → GQA, or GQA → fewer groups).

Each new KV head replaces ``r = old_kv / new_kv`` old KV heads; the query heads that used those old heads now
share the new one. Two groupings:

- ``mean`` (Ainslie et al., GQA): contiguous old heads, K and V projections (and biases) mean-pooled.
- ``key`` (after KDGQA/DGQA, adapted to a decoder checkpoint): choose *which* old heads share a new head from the
  similarity of their activations on calibration text, permute heads so each group is contiguous (q rows, o columns,
  k/v rows together), and pool with norm-aware weights: every member's K (V) projection is divided by its key (value)
  norm ``c_i`` before averaging, and ``c_i / mean(c)`` is folded back into that member's query rows (o_proj columns),
  so heads with very different scales are merged without one dominating and each query keeps its logit scale.
  Per group (and separately for K and V) the norm-aware pooling is used only where it gives a smaller merge error
  on the calibration activations than plain mean pooling (both errors follow from the Gram matrix).

Similarity of two heads is the uncentred cosine of their normalised K activations plus that of their V
activations over all calibration tokens (pre-RoPE; RoPE rotates every head alike). For normalised heads the
squared error of replacing a group by its mean equals ``r·T − (T/r)·Σ_{i,j∈group} C_ij``, so maximising the
within-group similarity sum minimises the merge error. Partitions are searched exhaustively when there are at most
20 000 of them (8 heads → 4, 2 or 1: ≤ 105), else greedily with pairwise-swap refinement; the contiguous partition
is always a candidate, so ``key`` never picks a worse-scoring grouping than ``mean``'s.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from seqtool.arch.registry import decoder_layers, get_family, head_counts, require_plain_layers
from seqtool.convert.base import Conversion, register
from seqtool.convert.calib import run_batches
from seqtool.convert.layout import AttnWeights, head_rows, read_attention, set_shape, write_attention
from seqtool.errors import BadInputError

GROUPINGS = ("mean", "key")
_MAX_EXHAUSTIVE = 20_000


@register("gqa")
@dataclass
class GQAConversion(Conversion):
    """Options: ``kv_heads`` (new KV-head count, must divide the current one), ``grouping`` (mean|key)."""

    changed_kinds: ClassVar[tuple[str, ...]] = ("attention",)
    kv_heads: int
    grouping: str = "mean"

    @property
    def needs_calibration(self) -> bool:
        return self.grouping == "key"

    def check(self, model: nn.Module) -> None:
        require_plain_layers(model, "convert --to gqa")
        if self.grouping not in GROUPINGS:
            raise BadInputError(f"unknown grouping '{self.grouping}'; use one of {', '.join(GROUPINGS)}")
        _, kv, _ = head_counts(model.config)
        n = self.kv_heads
        if not isinstance(n, int) or n < 1 or kv % n:
            divisors = [d for d in range(1, kv + 1) if kv % d == 0]
            raise BadInputError(
                f"--kv-heads {n} must divide the current {kv} KV heads; use one of {', '.join(map(str, divisors))}"
            )

    def apply(self, model: nn.Module, calib_ids: torch.Tensor | None) -> dict:
        heads, kv, head_dim = head_counts(model.config)
        details = {"method": f"gqa-{self.grouping}", "from_kv_heads": kv, "kv_heads": self.kv_heads}
        if self.kv_heads == kv:  # nothing to merge: the checkpoint is returned unchanged (exact case)
            return {**details, "groups": None}
        spec = get_family(model)
        stats = collect_kv_gram(model, calib_ids) if self.grouping == "key" else None
        all_groups = [self.merge_layer(layer, spec, heads, kv, head_dim, None if stats is None else stats[i])
                      for i, layer in enumerate(decoder_layers(model))]
        set_shape(model, heads=heads, kv_heads=self.kv_heads, head_dim=head_dim)
        return {**details, "groups": all_groups}

    def merge_layer(self, layer: nn.Module, spec, heads: int, kv: int, head_dim: int,
                    stats: tuple[torch.Tensor, torch.Tensor, int] | None) -> list[list[int]]:
        """Rewrite one decoder layer's attention in place (``stats``: its K/V Gram matrices for ``key``
        grouping, None for ``mean``); returns the groups of old KV heads."""
        attn = getattr(layer, spec.attention)
        r = kv // self.kv_heads
        w = read_attention(attn, spec, heads, head_dim)
        if stats is None:
            groups = [list(range(g * r, (g + 1) * r)) for g in range(self.kv_heads)]
            k_scale = v_scale = torch.ones(kv, dtype=torch.float64)
        else:
            gram_k, gram_v, n_tok = stats
            groups = best_partition(correlation(gram_k) + correlation(gram_v), r)
            k_scale = pooling_scales(gram_k, groups, n_tok)
            v_scale = pooling_scales(gram_v, groups, n_tok)
            if spec.qk_norms:  # k_norm re-normalises every key and q_norm hides per-head query scales
                k_scale = torch.ones(kv, dtype=torch.float64)
        write_attention(attn, spec, merge_heads(w, groups, head_dim, heads // kv, k_scale, v_scale))
        return groups

    def stream_rewrite(self, model: nn.Module, calib_ids: torch.Tensor | None):
        """The streamed form of :meth:`apply` (:mod:`seqtool.convert.streamed`): ``model`` is the source model
        (meta, or loaded offloaded when ``key`` grouping calibrates on it). Returns (rewrite layer i in place,
        set the output shape on a model, details once every layer is done)."""
        spec = get_family(model)
        heads, kv, head_dim = head_counts(model.config)
        stats = collect_kv_gram(model, calib_ids) if self.grouping == "key" and self.kv_heads != kv else None
        groups: dict[int, list] = {}

        def rewrite(i: int, layer: nn.Module) -> None:
            if self.kv_heads != kv:
                groups[i] = self.merge_layer(layer, spec, heads, kv, head_dim, None if stats is None else stats[i])

        def reshape(target: nn.Module) -> None:
            set_shape(target, heads=heads, kv_heads=self.kv_heads, head_dim=head_dim)

        def details() -> dict:
            base = {"method": f"gqa-{self.grouping}", "from_kv_heads": kv, "kv_heads": self.kv_heads}
            return {**base, "groups": [groups[i] for i in sorted(groups)] if groups else None}

        return rewrite, reshape, details


def merge_heads(w: AttnWeights, groups: list[list[int]], head_dim: int, q_per_kv: int,
                k_scale: torch.Tensor, v_scale: torch.Tensor) -> AttnWeights:
    """Pool old KV heads into one new head per group; permute and rescale query rows / o columns to match.

    ``groups``: lists of old KV-head indices (equal sizes). ``k_scale``/``v_scale`` (old_kv,): per-head norms
    (all ones = plain mean pooling).
    """
    order = [h for g in groups for h in g]
    q_heads = [h * q_per_kv + j for h in order for j in range(q_per_kv)]
    q_rows = head_rows(q_heads, head_dim).to(w.q.device)
    dtype = w.q.dtype
    # Per query head (new order): its old KV head's scale relative to its group's mean scale.
    k_rel, v_rel = torch.ones(len(q_heads), dtype=torch.float64), torch.ones(len(q_heads), dtype=torch.float64)
    new_k, new_v, new_kb, new_vb = [], [], [], []
    for gi, group in enumerate(groups):
        kc, vc = k_scale[group], v_scale[group]
        k_rel[gi * len(group) * q_per_kv:(gi + 1) * len(group) * q_per_kv] = (kc / kc.mean()).repeat_interleave(q_per_kv)
        v_rel[gi * len(group) * q_per_kv:(gi + 1) * len(group) * q_per_kv] = (vc / vc.mean()).repeat_interleave(q_per_kv)
        new_k.append(_pool(w.k, group, head_dim, kc))
        new_v.append(_pool(w.v, group, head_dim, vc))
        if w.k_bias is not None:
            new_kb.append(_pool(w.k_bias[:, None], group, head_dim, kc)[:, 0])
        if w.v_bias is not None:
            new_vb.append(_pool(w.v_bias[:, None], group, head_dim, vc)[:, 0])
    q_mult = k_rel.repeat_interleave(head_dim).to(w.q.device, dtype)
    o_mult = v_rel.repeat_interleave(head_dim).to(w.q.device, dtype)
    return AttnWeights(
        q=w.q[q_rows] * q_mult[:, None],
        k=torch.cat(new_k), v=torch.cat(new_v),
        o=w.o[:, q_rows] * o_mult[None, :],
        q_bias=None if w.q_bias is None else w.q_bias[q_rows] * q_mult,
        k_bias=torch.cat(new_kb) if new_kb else None,
        v_bias=torch.cat(new_vb) if new_vb else None,
        o_bias=w.o_bias,
    )


def _pool(weight: torch.Tensor, group: list[int], head_dim: int, scale: torch.Tensor) -> torch.Tensor:
    """mean(scale) · mean_i(W_i / scale_i) over the group's heads: (D, in) from (H*D, in)."""
    blocks = weight.reshape(-1, head_dim, weight.shape[-1])[group].double()
    scale = scale.to(blocks.device)
    pooled = (blocks / scale[:, None, None]).mean(0) * scale.mean()
    return pooled.to(weight.dtype)


def merge_errors(gram: torch.Tensor, group: list[int], scale: torch.Tensor) -> float:
    """Σ_t Σ_i ‖a_i − s_i·mean_j(a_j / s_j)‖² over calibration tokens, from the Gram matrix: the error each member
    sees after pooling with per-head scales ``s`` folded back (all ones = plain mean pooling)."""
    g = gram[group][:, group]
    s = scale[group]
    gn = g / s[:, None] / s[None, :]
    r = len(group)
    per_member = gn.diagonal() - 2 * gn.sum(1) / r + gn.sum() / r**2
    return float((s**2 * per_member).sum())


def pooling_scales(gram: torch.Tensor, groups: list[list[int]], n_tok: int) -> torch.Tensor:
    """Per-head scales for pooling: the activation RMS norm (norm-aware) in groups where that gives a smaller
    calibration merge error than plain mean pooling, else ones."""
    norms = (gram.diagonal() / max(n_tok, 1)).sqrt().clamp_min(1e-12)
    scale = torch.ones_like(norms)
    for group in groups:
        if merge_errors(gram, group, norms) < merge_errors(gram, group, scale) - 1e-12:
            scale[group] = norms[group]
    return scale


def correlation(gram: torch.Tensor) -> torch.Tensor:
    """Uncentred cosine similarity of heads from their Gram matrix (H, H)."""
    d = gram.diagonal().clamp_min(1e-30).sqrt()
    return gram / d[:, None] / d[None, :]


@torch.no_grad()
def collect_kv_gram(model: nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Per layer: Gram matrices (Hkv, Hkv) of K and of V activations summed over calibration tokens, and the
    token count. ``G[i, j] = Σ_t <k_i,t, k_j,t>`` on the projection outputs (pre-norm, pre-RoPE)."""
    spec = get_family(model)
    heads, kv, head_dim = head_counts(model.config)
    layers = decoder_layers(model)
    stats = [[torch.zeros(kv, kv, dtype=torch.float64), torch.zeros(kv, kv, dtype=torch.float64), 0] for _ in layers]

    def gram(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, kv, head_dim).double()
        return torch.einsum("nhd,ngd->hg", x, x).cpu()

    def hook_for(i: int, part: str):
        def hook(_module, _inputs, out):
            if part == "qkv":
                q_end = heads * head_dim
                k, v = out[..., q_end:q_end + kv * head_dim], out[..., q_end + kv * head_dim:]
                stats[i][0] += gram(k)
                stats[i][1] += gram(v)
                stats[i][2] += k.shape[0] * k.shape[1]
            elif part == "k":
                stats[i][0] += gram(out)
                stats[i][2] += out.shape[0] * out.shape[1]
            else:
                stats[i][1] += gram(out)
        return hook

    handles = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, spec.attention)
        if spec.fused_qkv:
            handles.append(getattr(attn, spec.qkv_proj).register_forward_hook(hook_for(i, "qkv")))
        else:
            handles.append(getattr(attn, spec.k_proj).register_forward_hook(hook_for(i, "k")))
            handles.append(getattr(attn, spec.v_proj).register_forward_hook(hook_for(i, "v")))
    try:
        run_batches(model, ids)
    finally:
        for h in handles:
            h.remove()
    return [(g_k, g_v, n) for g_k, g_v, n in stats]


def partition_score(sim: torch.Tensor, groups: list[list[int]]) -> float:
    """Σ over groups of Σ_{i,j in group} sim[i, j] (higher = members more alike)."""
    return float(sum(sim[g][:, g].sum() for g in groups))


def _count_partitions(n: int, r: int) -> int:
    return math.factorial(n) // (math.factorial(r) ** (n // r) * math.factorial(n // r))


def _all_partitions(items: list[int], r: int):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for mates in itertools.combinations(rest, r - 1):
        remaining = [x for x in rest if x not in mates]
        for tail in _all_partitions(remaining, r):
            yield [[first, *mates], *tail]


def best_partition(sim: torch.Tensor, r: int) -> list[list[int]]:
    """Equal-size groups of ``r`` heads maximising within-group similarity (sim: (H, H)); sorted, canonical."""
    n = sim.shape[0]
    contiguous = [list(range(g * r, (g + 1) * r)) for g in range(n // r)]
    if r == 1 or r == n:
        return contiguous
    if _count_partitions(n, r) <= _MAX_EXHAUSTIVE:
        candidates = _all_partitions(list(range(n)), r)
    else:
        candidates = [_refine(sim, contiguous), _refine(sim, _greedy(sim, r))]
    best, best_score = contiguous, partition_score(sim, contiguous)
    for cand in candidates:
        score = partition_score(sim, cand)
        if score > best_score + 1e-9:
            best, best_score = cand, score
    return sorted(sorted(g) for g in best)


def _greedy(sim: torch.Tensor, r: int) -> list[list[int]]:
    left = set(range(sim.shape[0]))
    groups = []
    while left:
        seed = max(left, key=lambda h: max((float(sim[h, o]) for o in left if o != h), default=0.0))
        group = [seed]
        left.remove(seed)
        while len(group) < r:
            nxt = max(left, key=lambda h: float(sim[h, group].sum()))
            group.append(nxt)
            left.remove(nxt)
        groups.append(group)
    return groups


def _refine(sim: torch.Tensor, groups: list[list[int]]) -> list[list[int]]:
    """Swap heads between groups while that raises the score (first-improvement local search)."""
    groups = [list(g) for g in groups]
    improved = True
    while improved:
        improved = False
        for a, b in itertools.combinations(range(len(groups)), 2):
            for i, j in itertools.product(range(len(groups[a])), range(len(groups[b]))):
                before = partition_score(sim, [groups[a], groups[b]])
                groups[a][i], groups[b][j] = groups[b][j], groups[a][i]
                if partition_score(sim, [groups[a], groups[b]]) > before + 1e-9:
                    improved = True
                else:
                    groups[a][i], groups[b][j] = groups[b][j], groups[a][i]
    return groups
