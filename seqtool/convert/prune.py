"""``seqtool prune``: structured removal of attention heads and MLP channels (AMP, Mugnaini et al.).

Importance on calibration text (``criterion="amp"``):
- head ``h``: mean over tokens of ``‖x_h W_O[:, h]ᵀ‖₁``, the L1 norm of the head's contribution through o_proj
  (``x_h`` (T, D) is its slice of the o_proj input, ``W_O[:, h]`` (hidden, D) its block of o_proj columns);
- MLP channel ``c``: mean over tokens of ``|input to down_proj|_c``.
Baselines scored on the same slices: ``magnitude`` (L2 norm of the weights a head / channel owns) and ``random``
(uniform scores from ``seed``).

Budget: ``ratio`` is the fraction of attention + MLP parameters removed (embeddings, norms outside those modules
and lm_head are not counted), the same in every layer. Heads are removed in units that keep a valid config:
one head on MHA; on GQA either one query head from *every* KV group (``gqa_unit="query"``, KV cache unchanged) or
whole KV groups (``gqa_unit="group"``). With the default target both heads and MLP are pruned: the head count is
the rounded ratio of units and MLP channels absorb the remainder; ``round_to`` keeps the intermediate size a
multiple of that number. Removed heads take q/k/v rows and o columns, removed channels gate/up rows and down
columns (fused ``qkv_proj`` / ``gate_up_proj`` layouts included).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from seqtool.arch.offload import module_weights
from seqtool.arch.registry import decoder_layers, get_family, head_counts, require_plain_layers
from seqtool.convert.base import Conversion, register
from seqtool.convert.calib import run_batches
from seqtool.convert.layout import (AttnWeights, MlpWeights, current_shape, head_rows, read_attention, read_mlp,
                                    set_shape, write_attention, write_mlp)
from seqtool.errors import BadInputError

CRITERIA = ("amp", "magnitude", "random")
TARGETS = ("heads", "mlp")
GQA_UNITS = ("query", "group")


@dataclass
class PrunePlan:
    """How many units / channels each layer loses, and what the parameter count becomes."""

    unit: str  # head (MHA) | query (one query head per KV group) | group (a KV head with its query heads)
    units: int
    units_removed: int
    unit_params: int
    channels_removed: int
    channel_params: int
    layer_params: int
    heads: int
    kv_heads: int
    intermediate: int

    @property
    def expected_ratio(self) -> float:
        return (self.units_removed * self.unit_params + self.channels_removed * self.channel_params) / self.layer_params


def parse_targets(target: str | tuple | list) -> tuple[str, ...]:
    parts = [t.strip() for t in (target.split(",") if isinstance(target, str) else target) if t.strip()]
    bad = [t for t in parts if t not in TARGETS]
    if bad or not parts:
        raise BadInputError(f"unknown --target '{','.join(map(str, parts))}'; use heads, mlp or heads,mlp")
    return tuple(t for t in TARGETS if t in parts)


def plan_prune(model: nn.Module, ratio: float, targets: tuple[str, ...], round_to: int | None,
               gqa_unit: str) -> PrunePlan:
    """Per-layer removal counts for ``ratio`` of the layer's attention + MLP parameters (see module docstring)."""
    spec = get_family(model)
    heads, kv, head_dim, inter = current_shape(model)
    layer = decoder_layers(model)[0]
    attn, mlp = getattr(layer, spec.attention), getattr(layer, spec.mlp)
    layer_params = sum(p.numel() for p in attn.parameters()) + sum(p.numel() for p in mlp.parameters())
    w, m = read_attention(attn, spec, heads, head_dim), read_mlp(mlp, spec)
    hidden = w.q.shape[1]
    q_params = 2 * head_dim * hidden + (head_dim if w.q_bias is not None else 0)
    kv_params = 2 * head_dim * hidden + head_dim * ((w.k_bias is not None) + (w.v_bias is not None))
    ch_params = 3 * hidden + (m.gate_bias is not None) + (m.up_bias is not None)
    group = heads // kv
    if kv == heads:
        unit, units, unit_params = "head", heads, q_params + kv_params
    elif gqa_unit == "group":
        unit, units, unit_params = "group", kv, group * q_params + kv_params
    else:
        unit, units, unit_params = "query", group, kv * q_params
    target = ratio * layer_params

    def channels_for(budget: float) -> int:
        c = min(max(round(budget / ch_params), 0), inter - 1)
        if round_to:
            kept = max(round_to, round((inter - c) / round_to) * round_to)
            while kept > inter:
                kept -= round_to
            c = inter - kept
        return c

    if round_to and inter < round_to:
        raise BadInputError(f"--round-to {round_to} is larger than the intermediate size {inter}; use a smaller value")
    group_of_unit = {"head": (1, 1), "group": (group, 1), "query": (kv, 0)}[unit]

    def accepted(u: int) -> bool:
        return u <= units - 1 and config_accepts(model, heads - u * group_of_unit[0], kv - u * group_of_unit[1])

    def nearest_units(x: float) -> list[int]:
        """Unit counts the config class accepts, nearest to ``x`` first (smaller first on ties)."""
        return [u for u in sorted(range(units), key=lambda u: (abs(u - x), u)) if accepted(u)]

    if targets == ("heads",):
        u, c = nearest_units(target / unit_params)[0], 0
        if abs(u * unit_params - target) > unit_params:
            most = max(nearest_units(units)) * unit_params / layer_params
            raise BadInputError(f"ratio {ratio} is not reachable within one head with --target heads (at most "
                                f"{most:.3f}; the config class must accept the head count); lower --ratio or use "
                                "--target heads,mlp")
    elif targets == ("mlp",):
        u, c = 0, channels_for(target)
        if target - c * ch_params > ch_params:
            most = (inter - (round_to or 1)) * ch_params / layer_params
            raise BadInputError(f"ratio {ratio} is not reachable with --target mlp (at most {most:.3f}); "
                                "lower --ratio or use --target heads,mlp")
    else:
        # Heads take the ratio too (rounded to a count the config accepts) unless that alone overshoots the budget.
        u = next(u for u in nearest_units(ratio * units) if u * unit_params <= target)
        c = channels_for(target - u * unit_params)
    new_heads, new_kv = {"head": (heads - u, kv - u), "group": (heads - u * group, kv - u),
                         "query": (heads - u * kv, kv)}[unit]
    return PrunePlan(unit, units, u, unit_params, c, ch_params, layer_params, new_heads, new_kv, inter - c)


def config_accepts(model: nn.Module, heads: int, kv_heads: int) -> bool:
    """Whether the model's own config class accepts these head counts (e.g. transformers' LlamaConfig requires
    hidden_size % heads == 0 even with an explicit head_dim): the saved checkpoint must load in plain transformers."""
    spec = get_family(model)
    values = model.config.to_dict()
    values.update({spec.config_keys["heads"]: heads, spec.config_keys["kv_heads"]: kv_heads,
                   spec.config_keys["head_dim"]: head_counts(model.config)[2]})
    values.pop("seqtool", None)
    try:
        type(model.config).from_dict(values)
    except Exception:  # the config class's own validation says no
        return False
    return True


# ---------------------------------------------------------------------------------------------- scores


@torch.no_grad()
def amp_scores(model: nn.Module, ids: torch.Tensor, token_chunk: int = 2048) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (query-head scores (Hq,), channel scores (I,)), means over calibration tokens."""
    spec = get_family(model)
    heads, _, head_dim = head_counts(model.config)
    layers = decoder_layers(model)
    sums = [[torch.zeros(heads, dtype=torch.float64), None, 0] for _ in layers]

    def o_hook(i: int, o_proj: nn.Linear):
        def hook(_module, args):
            x = args[0].reshape(-1, heads, head_dim)
            with module_weights(o_proj):  # accelerate-offloaded weights are loaded only inside its own forward
                w_o = o_proj.weight.reshape(o_proj.weight.shape[0], heads, head_dim).to(x.device)
                for s in range(0, x.shape[0], token_chunk):
                    contrib = torch.einsum("nhd,ohd->nho", x[s:s + token_chunk].float(), w_o.float())
                    sums[i][0] += contrib.abs().sum(-1).sum(0).double().cpu()
            sums[i][2] += x.shape[0]
        return hook

    def down_hook(i: int):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float().abs().sum(0).double().cpu()
            sums[i][1] = x if sums[i][1] is None else sums[i][1] + x
        return hook

    handles = []
    for i, layer in enumerate(layers):
        o_proj = getattr(getattr(layer, spec.attention), spec.o_proj)
        handles.append(o_proj.register_forward_pre_hook(o_hook(i, o_proj)))
        handles.append(getattr(getattr(layer, spec.mlp), spec.down_proj).register_forward_pre_hook(down_hook(i)))
    try:
        run_batches(model, ids)
    finally:
        for h in handles:
            h.remove()
    return [(h / n, c / n) for h, c, n in sums]


def magnitude_scores(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer: squared L2 norms of each query head's (q rows + o columns), each KV head's (k + v rows, biases
    included) and each channel's (gate + up rows, down column) weights."""
    spec = get_family(model)
    heads, _, head_dim = head_counts(model.config)
    return [layer_magnitude(layer, spec, heads, head_dim) for layer in decoder_layers(model)]


def layer_magnitude(layer: nn.Module, spec, heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`magnitude_scores` of one decoder layer: (query heads (Hq,), KV heads (Hkv,), channels (I,))."""
    w = read_attention(getattr(layer, spec.attention), spec, heads, head_dim)
    m = read_mlp(getattr(layer, spec.mlp), spec)

    def per_head(t: torch.Tensor | None, rows_dim: int = 0) -> torch.Tensor:
        if t is None:
            return 0
        t = t.float() if rows_dim == 0 else t.float().T
        return t.reshape(-1, head_dim, *t.shape[1:]).pow(2).flatten(1).sum(1)

    q = per_head(w.q) + per_head(w.o, rows_dim=1) + per_head(w.q_bias)
    kv = per_head(w.k) + per_head(w.v) + per_head(w.k_bias) + per_head(w.v_bias)
    ch = m.gate.float().pow(2).sum(1) + m.up.float().pow(2).sum(1) + m.down.float().pow(2).sum(0)
    for b in (m.gate_bias, m.up_bias):
        if b is not None:
            ch = ch + b.float().pow(2)
    return q.double().cpu(), kv.double().cpu(), ch.double().cpu()


# ---------------------------------------------------------------------------------------------- slicing


def _lowest(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` smallest scores (stable: earlier index first on ties)."""
    return sorted(torch.argsort(scores, stable=True)[:k].tolist())


def choose_heads(plan: PrunePlan, q_scores: torch.Tensor, kv_scores: torch.Tensor | None,
                 heads: int, kv: int) -> tuple[list[int], list[int]]:
    """Kept (query heads, KV heads), ascending. ``q_scores`` (Hq,), ``kv_scores`` (Hkv,) or None (AMP: KV heads
    have no contribution of their own, they act through their query heads)."""
    group = heads // kv
    kv_part = kv_scores if kv_scores is not None else torch.zeros(kv, dtype=q_scores.dtype)
    if plan.unit == "head":
        removed = _lowest(q_scores + kv_part, plan.units_removed)
        kept = [h for h in range(heads) if h not in removed]
        return kept, kept
    if plan.unit == "group":
        unit_scores = q_scores.reshape(kv, group).sum(1) + kv_part
        removed = _lowest(unit_scores, plan.units_removed)
        kept_kv = [g for g in range(kv) if g not in removed]
        return [g * group + j for g in kept_kv for j in range(group)], kept_kv
    kept_q = []
    for g in range(kv):  # the same number of query heads leaves every group
        drop = _lowest(q_scores[g * group:(g + 1) * group], plan.units_removed)
        kept_q += [g * group + j for j in range(group) if j not in drop]
    return kept_q, list(range(kv))


def slice_attention(w: AttnWeights, kept_q: list[int], kept_kv: list[int], head_dim: int) -> AttnWeights:
    q_rows, kv_rows = head_rows(kept_q, head_dim).to(w.q.device), head_rows(kept_kv, head_dim).to(w.q.device)
    pick = lambda t, rows: None if t is None else t[rows]  # noqa: E731
    return AttnWeights(q=w.q[q_rows], k=w.k[kv_rows], v=w.v[kv_rows], o=w.o[:, q_rows],
                       q_bias=pick(w.q_bias, q_rows), k_bias=pick(w.k_bias, kv_rows),
                       v_bias=pick(w.v_bias, kv_rows), o_bias=w.o_bias)


def slice_mlp(m: MlpWeights, kept: list[int]) -> MlpWeights:
    idx = torch.as_tensor(kept, dtype=torch.long, device=m.gate.device)
    pick = lambda t: None if t is None else t[idx]  # noqa: E731
    return MlpWeights(gate=m.gate[idx], up=m.up[idx], down=m.down[:, idx], gate_bias=pick(m.gate_bias),
                      up_bias=pick(m.up_bias), down_bias=m.down_bias)


# ---------------------------------------------------------------------------------------------- conversion


@register("prune")
@dataclass
class PruneConversion(Conversion):
    """Options: ``ratio`` in [0, 1), ``target`` (heads,mlp), ``criterion`` (amp|magnitude|random), ``round_to``
    (intermediate multiple), ``gqa_unit`` (query|group), ``seed`` (random criterion)."""

    op = "prune"
    ratio: float
    target: str = "heads,mlp"
    criterion: str = "amp"
    round_to: int | None = None
    gqa_unit: str = "query"
    seed: int = 0

    @property
    def needs_calibration(self) -> bool:
        return self.criterion == "amp"

    def check(self, model: nn.Module) -> None:
        require_plain_layers(model, "prune")
        if not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
            raise BadInputError(f"--ratio must be in [0, 1), got {self.ratio}")
        if self.criterion not in CRITERIA:
            raise BadInputError(f"unknown criterion '{self.criterion}'; use one of {', '.join(CRITERIA)}")
        if self.gqa_unit not in GQA_UNITS:
            raise BadInputError(f"unknown --gqa-unit '{self.gqa_unit}'; use one of {', '.join(GQA_UNITS)}")
        if self.round_to is not None and self.round_to < 1:
            raise BadInputError(f"--round-to must be a positive integer, got {self.round_to}")
        self.target = ",".join(parse_targets(self.target))
        plan_prune(model, float(self.ratio), parse_targets(self.target), self.round_to, self.gqa_unit)

    def step(self) -> dict:
        step = super().step()
        step.pop("to")
        return step

    def apply(self, model: nn.Module, calib_ids: torch.Tensor | None) -> dict:
        spec = get_family(model)
        heads, kv, head_dim, inter = current_shape(model)
        plan = plan_prune(model, float(self.ratio), parse_targets(self.target), self.round_to, self.gqa_unit)
        n_layers = len(decoder_layers(model))
        if self.criterion == "amp":
            scores = [(q, None, c) for q, c in amp_scores(model, calib_ids)]
        elif self.criterion == "magnitude":
            scores = magnitude_scores(model)
        else:
            gen = torch.Generator().manual_seed(self.seed)
            scores = [(torch.rand(heads, generator=gen, dtype=torch.float64), None,
                       torch.rand(inter, generator=gen, dtype=torch.float64)) for _ in range(n_layers)]
        removed_heads = [prune_layer(layer, spec, plan, layer_scores, heads, kv, head_dim, inter)
                         for layer, layer_scores in zip(decoder_layers(model), scores)]
        set_shape(model, heads=plan.heads, kv_heads=plan.kv_heads, head_dim=head_dim, intermediate=plan.intermediate)
        return _details(self.criterion, plan, removed_heads)

    def stream_rewrite(self, model: nn.Module, calib_ids: torch.Tensor | None):
        """The streamed form of :meth:`apply` (:mod:`seqtool.convert.streamed`): ``model`` is the source model
        (meta, or loaded offloaded for ``amp`` calibration). Returns (rewrite layer i in place, set the output
        shape on a model, details once every layer is done); scores are the in-memory path's, layer by layer."""
        spec = get_family(model)
        heads, kv, head_dim, inter = current_shape(model)
        plan = plan_prune(model, float(self.ratio), parse_targets(self.target), self.round_to, self.gqa_unit)
        n_layers = len(decoder_layers(model))
        scores: list | None = None
        if self.criterion == "amp":
            scores = [(q, None, c) for q, c in amp_scores(model, calib_ids)]
        elif self.criterion == "random":
            gen = torch.Generator().manual_seed(self.seed)
            scores = [(torch.rand(heads, generator=gen, dtype=torch.float64), None,
                       torch.rand(inter, generator=gen, dtype=torch.float64)) for _ in range(n_layers)]
        removed: dict[int, list[int]] = {}

        def rewrite(i: int, layer: nn.Module) -> None:
            layer_scores = scores[i] if scores is not None else layer_magnitude(layer, spec, heads, head_dim)
            removed[i] = prune_layer(layer, spec, plan, layer_scores, heads, kv, head_dim, inter)

        def reshape(target: nn.Module) -> None:
            set_shape(target, heads=plan.heads, kv_heads=plan.kv_heads, head_dim=head_dim,
                      intermediate=plan.intermediate)

        return rewrite, reshape, lambda: _details(self.criterion, plan, [removed[i] for i in sorted(removed)])


def _details(criterion: str, plan: PrunePlan, removed_heads: list[list[int]]) -> dict:
    return {"method": criterion, "heads": plan.heads, "kv_heads": plan.kv_heads,
            "intermediate": plan.intermediate, "achieved_ratio": round(plan.expected_ratio, 6),
            "unit": plan.unit, "units_removed": plan.units_removed, "channels_removed": plan.channels_removed,
            "removed_heads": removed_heads}


def prune_layer(layer: nn.Module, spec, plan: PrunePlan, scores: tuple, heads: int, kv: int, head_dim: int,
                inter: int) -> list[int]:
    """Slice one decoder layer in place by its ``scores`` (query-head (Hq,), KV-head (Hkv,) or None, channel
    (I,)); returns the removed query heads."""
    q_s, kv_s, ch_s = scores
    attn, mlp = getattr(layer, spec.attention), getattr(layer, spec.mlp)
    kept_q, kept_kv = choose_heads(plan, q_s, kv_s, heads, kv)
    dropped_c = set(_lowest(ch_s, plan.channels_removed))
    write_attention(attn, spec, slice_attention(read_attention(attn, spec, heads, head_dim), kept_q,
                                                kept_kv, head_dim))
    write_mlp(mlp, spec, slice_mlp(read_mlp(mlp, spec), [c for c in range(inter) if c not in dropped_c]))
    return [h for h in range(heads) if h not in kept_q]
