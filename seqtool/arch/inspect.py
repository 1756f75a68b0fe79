"""Describe a checkpoint from its shapes alone (meta tensors: nothing is allocated)."""
from __future__ import annotations

from dataclasses import dataclass, field

from seqtool.arch.io import DTYPE_NAMES, load_model
from seqtool.arch.registry import (LayerKind, config_value, get_family, head_counts, kv_cache_bytes_per_token,
                                   layer_kinds, parameter_counts)


def layer_map(kinds: list[LayerKind]) -> list[str]:
    """Runs of equal layers, e.g. ``["0-3: attention + moe 4/top-2"]``."""
    runs: list[tuple[int, int, str]] = []
    for idx, kind in enumerate(kinds):
        label = kind.describe()
        if runs and runs[-1][2] == label:
            runs[-1] = (runs[-1][0], idx, label)
        else:
            runs.append((idx, idx, label))
    return [f"{a}: {label}" if a == b else f"{a}-{b}: {label}" for a, b, label in runs]


def _operations(kinds: list[LayerKind], kv_heads: int, moe_target: str | None) -> list[str]:
    plain = all(k.plain for k in kinds)
    ops = []
    if all(k.mixer == "attention" and k.attention_experts == 1 for k in kinds):
        ops.append("patch")
    if plain:
        ops += [*(["convert --to gqa"] if kv_heads > 1 else []), "prune",
                *(["convert --to moe"] if moe_target else []), "convert --to bam"]
    return [*ops, "profile", "eval"]


@dataclass
class InspectResult:
    source: str
    family: str
    model_class: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_position_embeddings: int | None
    params_total: int
    params_attention: int
    params_mlp: int
    params_embeddings: int
    dtype: str
    attn_implementation: str
    kv_cache_bytes_per_1k_tokens: int
    operations: list[str]
    recipe: list[dict] = field(default_factory=list)
    params_active: int = 0
    layer_map: list[str] = field(default_factory=list)


def _count(module) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())  # None: a hybrid's non-attention layer


def inspect_model(source: str, *, dtype: str = "auto") -> InspectResult:
    """Family, shapes, parameter counts and KV-cache size of ``source`` without allocating its weights."""
    loaded = load_model(source, dtype=dtype, device="cpu", meta=True, apply_recipe=False)
    model, config = loaded.model, loaded.model.config
    spec = get_family(model)
    heads, kv_heads, head_dim = head_counts(config)
    layers = model.get_submodule(spec.layers)
    attention = sum(_count(getattr(layer, spec.attention)) for layer in layers)
    mlp = sum(_count(getattr(layer, spec.mlp)) for layer in layers)
    embed = _count(model.get_submodule(spec.embed))
    lm_head = model.get_submodule(spec.lm_head)
    if not config.tie_word_embeddings:
        embed += _count(lm_head)
    total = sum(p.numel() for p in model.parameters())  # parameters() already de-duplicates tied weights
    weight_dtype = next(model.parameters()).dtype
    bytes_per = next(model.parameters()).element_size()
    kinds = layer_kinds(config)
    _, active = parameter_counts(model)
    return InspectResult(
        source=source, family=spec.family, model_class=type(model).__name__,
        layers=int(config_value(config, "layers")), hidden=int(config_value(config, "hidden")),
        heads=heads, kv_heads=kv_heads, head_dim=head_dim, intermediate=int(config_value(config, "intermediate")),
        vocab=int(config.vocab_size), max_position_embeddings=getattr(config, "max_position_embeddings", None),
        params_total=total, params_attention=attention, params_mlp=mlp, params_embeddings=embed,
        dtype=DTYPE_NAMES.get(weight_dtype, str(weight_dtype)),
        attn_implementation=str(getattr(config, "_attn_implementation", None) or "sdpa"),
        kv_cache_bytes_per_1k_tokens=kv_cache_bytes_per_token(config, bytes_per) * 1024,
        operations=_operations(kinds, kv_heads, spec.moe_target), recipe=loaded.recipe or _recipe_of(loaded),
        params_active=active, layer_map=layer_map(kinds),
    )


def _recipe_of(loaded) -> list[dict]:
    from seqtool import recipe

    return recipe.read(loaded.model.config)
