"""Module kinds: the one vocabulary (``--train attention,mlp,embed,norm``) every training command uses.

A kind maps a model to the fully qualified names of the modules it covers, using the family registry
(:mod:`seqtool.arch.registry`), never family names. Later issues add kinds (``mixer``, ``router``, ``experts``)
with :func:`register_kind`:

    @register_kind("router")
    def _router(model, spec):          # spec: the model's FamilySpec
        return [f"{spec.layers}.{i}.mlp.gate" for i in range(len(decoder_layers(model)))]

``--method full`` trains every parameter of the kinds' modules. ``--method lora`` puts adapters on the
``nn.Linear`` / ``nn.Embedding`` leaves inside them (the projections, fused ones included) and trains modules
without such leaves (norms) fully through peft's ``modules_to_save``.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from seqtool.arch.registry import FamilySpec, decoder_layers, get_family
from seqtool.errors import BadInputError

KindResolver = Callable[[nn.Module, FamilySpec], list[str]]
MODULE_KINDS: dict[str, KindResolver] = {}
DEFAULT_KINDS = ("attention", "mlp")


def register_kind(name: str) -> Callable[[KindResolver], KindResolver]:
    """Decorator: ``fn(model, spec) -> [qualified module names]`` becomes trainable kind ``name``."""

    def wrap(fn: KindResolver) -> KindResolver:
        MODULE_KINDS[name] = fn
        return fn

    return wrap


def _per_layer(model: nn.Module, spec: FamilySpec, attr: str) -> list[str]:
    n = len(decoder_layers(model))
    return [f"{spec.layers}.{i}.{attr}" for i in range(n)]


@register_kind("attention")
def _attention(model: nn.Module, spec: FamilySpec) -> list[str]:
    return _per_layer(model, spec, spec.attention)


@register_kind("mlp")
def _mlp(model: nn.Module, spec: FamilySpec) -> list[str]:
    return _per_layer(model, spec, spec.mlp)


@register_kind("embed")
def _embed(model: nn.Module, spec: FamilySpec) -> list[str]:
    names = [spec.embed]
    if not getattr(model.config, "tie_word_embeddings", False):
        names.append(spec.lm_head)
    return names


@register_kind("norm")
def _norm(model: nn.Module, spec: FamilySpec) -> list[str]:
    return [n for norm in spec.norms for n in _per_layer(model, spec, norm)] + [spec.final_norm]


def parse_kinds(kinds: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"attention,mlp"`` → ``["attention", "mlp"]``; unknown kinds are a one-line error."""
    names = [k.strip() for k in (kinds.split(",") if isinstance(kinds, str) else kinds) if k.strip()]
    bad = [k for k in names if k not in MODULE_KINDS]
    if bad or not names:
        raise BadInputError(f"unknown module kind {', '.join(bad) or '(none)'}; choose from {', '.join(MODULE_KINDS)}")
    return list(dict.fromkeys(names))


def _strip_wrappers(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (kinds are resolved on the plain model)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def kind_modules(model: nn.Module, kinds: str | list[str]) -> dict[str, list[str]]:
    """{kind: qualified module names} for ``model`` (a transformers causal LM)."""
    model = _strip_wrappers(model)
    spec = get_family(model)
    return {k: MODULE_KINDS[k](model, spec) for k in parse_kinds(kinds)}


def lora_plan(model: nn.Module, kinds: str | list[str]) -> tuple[list[str], list[str]]:
    """(LoRA target module names, fully trained module names) for ``--method lora`` on ``kinds``."""
    targets: list[str] = []
    full: list[str] = []
    for names in kind_modules(model, kinds).values():
        for name in names:
            module = model.get_submodule(name)
            leaves = [name if not sub else f"{name}.{sub}" for sub, m in module.named_modules()
                      if isinstance(m, (nn.Linear, nn.Embedding))]
            if leaves:
                targets += leaves
            elif any(True for _ in module.parameters()):
                full.append(name)
    return list(dict.fromkeys(targets)), list(dict.fromkeys(full))


def lora_targets(model: nn.Module) -> list[str]:
    """Projection names (relative to attention / MLP) of the default kinds: what ``--recover lora`` adapts."""
    spec = get_family(_strip_wrappers(model))
    names = [spec.qkv_proj] if spec.fused_qkv else [spec.q_proj, spec.k_proj, spec.v_proj]
    names += [spec.o_proj]
    names += [spec.gate_up_proj] if spec.fused_gate_up else [spec.gate_proj, spec.up_proj]
    return names + [spec.down_proj]
