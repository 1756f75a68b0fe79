"""Model-family registry: one JSON data entry per family in ``arch/families/``.

A :class:`FamilySpec` maps a ``config.model_type`` to module paths (decoder layers, attention projections,
MLP projections, norms) and config keys. Code elsewhere asks the spec instead of testing family names, so adding
a family means adding one JSON file (plus its tiny preset).

Layers are described one by one: :func:`layer_kinds` turns a config into one :class:`LayerKind` per decoder layer
(mixer kind, FFN kind, experts, attention experts), driven by the family's data: ``layer_types_key`` names the
config list of per-layer mixer names and ``mixer_kinds`` maps those names to seqtool's kinds; ``moe`` (a
:class:`MoeSpec`) says where routed FFN experts live and which layers have them; ``attention_experts`` (an
:class:`AttentionExpertsSpec`) says how many attention experts a layer mixes and whether they share K/V. Adding a
mixer kind (mamba2, linear, deltanet) = a ``mixer_kinds`` entry in the family JSON (config name → kind); its
layers then have ``kv_sets == 0`` in :func:`kv_cache_bytes_per_token`, and a recurrent-state size function is
the one thing to add beside it. Code that rewrites layers asks :func:`require_plain_layers` or reads the kinds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the CLI checks model families before importing torch
    import torch.nn as nn

from seqtool.errors import BadInputError, UnsupportedModelError

FAMILIES_DIR = Path(__file__).parent / "families"


MIXER_KINDS = ("attention", "mamba2", "linear", "deltanet")
FFN_KINDS = ("dense", "moe")
_DEFAULT_MIXER_KINDS = {"full_attention": "attention", "sliding_attention": "attention", "attention": "attention"}


@dataclass(frozen=True)
class MoeSpec:
    """Routed FFN experts of a family. Module names are relative to the layer's MLP module.

    In memory the experts are fused: ``experts.<gate_up>`` (E, 2I, hidden) holding [gate; up] rows per expert and
    ``experts.<down>`` (E, hidden, I); the router ``<router>.weight`` is (E, hidden). On disk (``saved_*``, paths
    relative to the decoder layer, ``{e}`` = expert index) every expert is its own set of 2-D tensors.
    ``dense_layers_key`` / ``sparse_step_key`` name config keys that keep some layers dense (Qwen-MoE style).
    """

    experts_key: str
    top_k_key: str
    intermediate_key: str
    router: str = "gate"
    experts: str = "experts"
    fused_gate_up: str = "gate_up_proj"
    fused_down: str = "down_proj"
    saved_expert: str = "mlp.experts.{e}"
    saved_gate: str = "gate_proj"
    saved_up: str = "up_proj"
    saved_down: str = "down_proj"
    saved_router: str = "mlp.gate"
    shared_expert: str | None = None
    shared_expert_gate: str | None = None
    shared_intermediate_key: str | None = None
    norm_topk_key: str | None = None
    dense_layers_key: str | None = None
    sparse_step_key: str | None = None


@dataclass(frozen=True)
class AttentionExpertsSpec:
    """Attention experts mixed by a soft router (BAM): config keys for their count and K/V sharing."""

    count_key: str
    kv_shared_key: str
    router: str = "router"


@dataclass(frozen=True)
class LayerKind:
    """What one decoder layer is made of.

    ``mixer``: attention | mamba2 | linear | deltanet. ``ffn``: dense | moe (``experts`` routed experts, ``top_k``
    active per token). ``attention_experts``: attention experts mixed by a soft router (1 = plain attention);
    ``kv_shared``: they share one K/V, so the cache holds one expert's keys and values.
    """

    mixer: str = "attention"
    ffn: str = "dense"
    experts: int = 0
    top_k: int = 0
    attention_experts: int = 1
    kv_shared: bool = False

    @property
    def kv_sets(self) -> int:
        """K/V sets this layer caches per token (0 for recurrent mixers, whose state does not grow)."""
        if self.mixer != "attention":
            return 0
        return 1 if self.kv_shared else self.attention_experts

    @property
    def plain(self) -> bool:
        """An ordinary attention + dense MLP layer (what layer-rewriting conversions and patches expect)."""
        return self.mixer == "attention" and self.ffn == "dense" and self.attention_experts == 1

    def describe(self) -> str:
        """Short label, e.g. ``attention``, ``attention x4 (kv-shared) + moe 4/top-2``."""
        text = self.mixer
        if self.attention_experts > 1:
            text += f" x{self.attention_experts}" + (" (kv-shared)" if self.kv_shared else "")
        if self.ffn == "moe":
            text += f" + moe {self.experts}/top-{self.top_k}"
        return text


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
    down_proj: str | None = None
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
    layer_types_key: str | None = None
    mixer_kinds: dict[str, str] = field(default_factory=lambda: dict(_DEFAULT_MIXER_KINDS))
    moe: MoeSpec | None = None
    attention_experts: AttentionExpertsSpec | None = None
    moe_target: str | None = None  # the family ``convert --to moe`` writes for this dense family
    # modules that replace ``attention`` in some layers of a hybrid family (a layer holds one of them or the
    # attention module); empty where the mixer sits under the attention module's own name
    mixers: tuple[str, ...] = ()

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
        if raw.get("moe"):
            raw["moe"] = MoeSpec(**raw["moe"])
        if raw.get("attention_experts"):
            raw["attention_experts"] = AttentionExpertsSpec(**raw["attention_experts"])
        if "mixer_kinds" in raw:
            raw["mixer_kinds"] = {**_DEFAULT_MIXER_KINDS, **raw["mixer_kinds"]}
        bad = set(raw.get("mixer_kinds", {}).values()) - set(MIXER_KINDS)
        if bad:
            raise ValueError(f"{path.name}: unknown mixer kind(s) {sorted(bad)}; known: {MIXER_KINDS}")
        raw["mixers"] = tuple(raw.get("mixers", ()))
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


def _get(config: Any, key: str | None, default: Any = None) -> Any:
    if key is None:
        return default
    value = config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)
    return default if value is None else value


def layer_kinds(config: Any) -> list[LayerKind]:
    """One :class:`LayerKind` per decoder layer of ``config`` (a config, a config dict or a model), from the
    family's data: mixer names from ``config.<layer_types_key>``, routed experts from ``moe``, attention experts
    from ``attention_experts``. Families without such data get ``[LayerKind()] * layers``."""
    config = getattr(config, "config", config)
    spec = get_family(config)
    n_layers = int(_get(config, spec.config_keys["layers"]))
    names = _get(config, spec.layer_types_key) or ["attention"] * n_layers
    kinds = []
    for idx in range(n_layers):
        name = names[idx]
        if name not in spec.mixer_kinds:
            raise UnsupportedModelError(f"layer {idx} has mixer type '{name}', which seqtool does not know for "
                                        f"'{spec.family}' (known: {', '.join(sorted(spec.mixer_kinds))})")
        fields: dict[str, Any] = {"mixer": spec.mixer_kinds[name]}
        moe = spec.moe
        experts = int(_get(config, moe.experts_key, 0)) if moe else 0
        if experts > 0:
            dense_layers = _get(config, moe.dense_layers_key, []) or []
            step = int(_get(config, moe.sparse_step_key, 1) or 1)
            if idx not in dense_layers and (idx + 1) % step == 0:
                fields.update(ffn="moe", experts=experts, top_k=int(_get(config, moe.top_k_key)))
        if spec.attention_experts is not None and fields["mixer"] == "attention":
            fields["attention_experts"] = int(_get(config, spec.attention_experts.count_key, 1))
            fields["kv_shared"] = bool(_get(config, spec.attention_experts.kv_shared_key, False))
        kinds.append(LayerKind(**fields))
    return kinds


def kv_cache_bytes_per_token(config: Any, bytes_per_element: int) -> int:
    """Analytic KV-cache size for one token: Σ over layers of kv_sets × 2 × kv_heads × head_dim × bytes
    (a plain model: layers × 2 × kv_heads × head_dim × bytes; attention experts without shared K/V multiply it)."""
    _, kv_heads, head_dim = head_counts(config)
    sets = sum(kind.kv_sets for kind in layer_kinds(config))
    return sets * 2 * kv_heads * head_dim * bytes_per_element


def require_plain_layers(model: Any, what: str) -> None:
    """Raise a one-line error when ``what`` (a conversion or patch name) meets a layer that is not plain
    attention + dense MLP (MoE, attention experts, recurrent mixers)."""
    for idx, kind in enumerate(layer_kinds(model)):
        if not kind.plain:
            family = get_family(model).family
            raise BadInputError(f"{what} rewrites plain attention + dense MLP layers; layer {idx} of this "
                                f"'{family}' model is '{kind.describe()}'")


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, active per token) parameters: routed FFN experts count top_k/experts of their size as active
    (a shared expert and soft-routed attention experts are always active). Works on meta models."""
    total = sum(p.numel() for p in model.parameters())
    spec = get_family(model)
    inactive = 0
    if spec.moe is not None:
        for layer, kind in zip(decoder_layers(model), layer_kinds(model.config)):
            if kind.ffn != "moe":
                continue
            experts = getattr(layer, spec.mlp).get_submodule(spec.moe.experts)
            size = sum(p.numel() for p in experts.parameters())
            inactive += size * (kind.experts - kind.top_k) // kind.experts
    return total, total - inactive


def attention_layer_indices(config: Any) -> list[int]:
    """Indices of the layers whose mixer is softmax attention (every layer unless the family is hybrid)."""
    return [i for i, kind in enumerate(layer_kinds(config)) if kind.mixer == "attention"]


def router_modules(model: nn.Module, spec: FamilySpec | None = None) -> list[tuple[str, int]]:
    """(qualified name, top-k) of every router of ``model``: top-k FFN routers (``<mlp>.<moe.router>``) and BAM's
    soft attention routers (``<attention>.<attention_experts.router>``, top-k 0 = all experts mixed)."""
    spec = spec or get_family(model)
    out = []
    for i, kind in enumerate(layer_kinds(model.config)):
        base = f"{spec.layers}.{i}"
        if kind.attention_experts > 1 and spec.attention_experts is not None:
            out.append((f"{base}.{spec.attention}.{spec.attention_experts.router}", 0))
        if kind.ffn == "moe":
            out.append((f"{base}.{spec.mlp}.{spec.moe.router}", kind.top_k))
    return out
