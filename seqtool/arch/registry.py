"""Model-family registry: one JSON data entry per family in ``arch/families/``.

A :class:`FamilySpec` maps a ``config.model_type`` to module paths (decoder layers, attention projections,
MLP projections, norms) and config keys. Code elsewhere asks the spec instead of testing family names, so adding
a family means adding one JSON file (plus its tiny preset).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch.nn as nn

from seqtool.errors import UnsupportedModelError

FAMILIES_DIR = Path(__file__).parent / "families"


@dataclass(frozen=True)
class FamilySpec:
    """Where a family keeps its parts. Projection names are relative to the attention / MLP module;
    ``qkv_proj`` / ``gate_up_proj`` are set (and the split names ``None``) for fused layouts."""

    family: str
    model_types: tuple[str, ...]
    causal_lm_class: str
    layers: str
    embed: str
    final_norm: str
    lm_head: str
    attention: str
    o_proj: str
    mlp: str
    down_proj: str
    q_proj: str | None = None
    k_proj: str | None = None
    v_proj: str | None = None
    qkv_proj: str | None = None
    gate_proj: str | None = None
    up_proj: str | None = None
    gate_up_proj: str | None = None
    qk_norms: tuple[str, ...] = ()
    norms: tuple[str, ...] = ()
    attention_bias: bool = False
    config_keys: dict[str, str] = field(default_factory=dict)
    # Hybrid families: modules that replace ``attention`` in some layers (a layer holds one of them, the others
    # are None), the config key listing each layer's kind, and the kinds that are softmax attention.
    mixers: tuple[str, ...] = ()
    layer_kinds: str | None = None
    attention_kinds: tuple[str, ...] = ()

    @property
    def fused_qkv(self) -> bool:
        return self.qkv_proj is not None

    @property
    def fused_gate_up(self) -> bool:
        return self.gate_up_proj is not None


@lru_cache(maxsize=1)
def all_families() -> dict[str, FamilySpec]:
    """Every registered family, keyed by family name."""
    families = {}
    for path in sorted(FAMILIES_DIR.glob("*.json")):
        raw = json.loads(path.read_text())
        raw["model_types"] = tuple(raw["model_types"])
        raw["qk_norms"] = tuple(raw.get("qk_norms", ()))
        raw["norms"] = tuple(raw.get("norms", ()))
        raw["mixers"] = tuple(raw.get("mixers", ()))
        raw["attention_kinds"] = tuple(raw.get("attention_kinds", ()))
        families[raw["family"]] = FamilySpec(**raw)
    return families


def supported_model_types() -> list[str]:
    return sorted(t for spec in all_families().values() for t in spec.model_types)


def get_family(config_or_model: Any) -> FamilySpec:
    """The spec for a model or config (anything with ``model_type`` or ``.config.model_type``)."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    for spec in all_families().values():
        if model_type in spec.model_types:
            return spec
    raise UnsupportedModelError(
        f"model family '{model_type}' is not supported; supported families: {', '.join(supported_model_types())}"
    )


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers."""
    return get_submodule(model, get_family(model).layers)


def attention_module(model: nn.Module, layer_idx: int) -> nn.Module:
    return getattr(decoder_layers(model)[layer_idx], get_family(model).attention)


def mlp_module(model: nn.Module, layer_idx: int) -> nn.Module:
    return getattr(decoder_layers(model)[layer_idx], get_family(model).mlp)


def config_value(config: Any, key: str) -> Any:
    """A config value by its registry key (``heads``, ``kv_heads``, ``head_dim``, ``hidden``, ...)."""
    spec = get_family(config)
    return getattr(config, spec.config_keys[key], None)


def head_counts(config: Any) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of a config; head_dim defaults to hidden // heads."""
    heads = int(config_value(config, "heads"))
    kv_heads = config_value(config, "kv_heads") or heads
    head_dim = config_value(config, "head_dim") or config_value(config, "hidden") // heads
    return heads, int(kv_heads), int(head_dim)


def attention_layer_indices(config: Any) -> list[int]:
    """Indices of the layers that are softmax attention (every layer unless the family is hybrid)."""
    spec = get_family(config)
    n_layers = int(config_value(config, "layers"))
    kinds = getattr(config, spec.layer_kinds, None) if spec.layer_kinds else None
    if not kinds:
        return list(range(n_layers))
    return [i for i, kind in enumerate(kinds) if kind in spec.attention_kinds]


def kv_cache_bytes_per_token(config: Any, bytes_per_element: int) -> int:
    """Analytic KV-cache size for one token: attention layers × 2 × kv_heads × head_dim × bytes (a hybrid's
    recurrent layers hold a constant-size state instead, not counted here)."""
    _, kv_heads, head_dim = head_counts(config)
    layers = len(attention_layer_indices(config))
    return layers * 2 * kv_heads * head_dim * bytes_per_element
