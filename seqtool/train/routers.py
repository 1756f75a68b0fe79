"""Mixture-of-Experts training pieces: the ``router`` / ``experts`` module kinds and the router losses.

Kinds (for ``--train``), resolved from the registry's per-layer description:
- ``router``: every routing module — top-k FFN routers (``<mlp>.<moe.router>``) and BAM's soft attention routers
  (``<attention>.<attention_experts.router>``);
- ``experts``: every layer's routed FFN experts (``<mlp>.<moe.experts>``). Attention experts are in ``attention``.

Objectives (for ``--loss``, e.g. ``lm=1,balance=0.01,zloss=0.001``), reported through the engine's aux-loss hook
(:func:`seqtool.train.objectives.emit_aux_loss`) by forward hooks on the routers, averaged over routers:
- ``balance``: Switch-Transformer load balancing, E · Σ_e f_e · P_e, with f_e the share of top-k assignments that
  go to expert e and P_e its mean router probability (soft routers: f = P). 1 when perfectly balanced.
- ``zloss``: router z-loss (ST-MoE), mean over tokens of logsumexp(router logits)².
"""
from __future__ import annotations

import torch
import torch.nn as nn

from seqtool.arch.registry import FamilySpec, layer_kinds, router_modules  # noqa: F401 (router_modules re-exported)
from seqtool.errors import BadInputError
from seqtool.train.kinds import register_kind
from seqtool.train.objectives import AuxLoss, emit_aux_loss

ROUTER_LOSSES = ("balance", "zloss")


@register_kind("router")
def _routers(model: nn.Module, spec: FamilySpec) -> list[str]:
    names = [name for name, _ in router_modules(model, spec)]
    if not names:
        raise BadInputError(f"--train router: this '{spec.family}' model has no routers (convert it with --to moe|bam)")
    return names


@register_kind("experts")
def _experts(model: nn.Module, spec: FamilySpec) -> list[str]:
    names = [f"{spec.layers}.{i}.{spec.mlp}.{spec.moe.experts}"
             for i, kind in enumerate(layer_kinds(model.config)) if kind.ffn == "moe"]
    if not names:
        raise BadInputError(f"--train experts: this '{spec.family}' model has no routed experts")
    return names


def balance_loss(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """E · Σ_e f_e · P_e for router ``logits`` (tokens, E); ``top_k`` 0 means a soft router (f = P)."""
    probs = torch.softmax(logits.float(), dim=-1)
    mean_p = probs.mean(0)
    if top_k:
        chosen = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)
        share = chosen.mean(0) / top_k
    else:
        share = mean_p
    return logits.shape[-1] * (share * mean_p).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of logsumexp(logits)² for router ``logits`` (tokens, E)."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


class RouterLoss(AuxLoss):
    """``balance`` or ``zloss`` (see the module docstring): hooks on the routers emit the term each forward."""

    def __init__(self, kind: str, weight: float = 1.0):
        if kind not in ROUTER_LOSSES:
            raise BadInputError(f"unknown router loss '{kind}'; use one of {', '.join(ROUTER_LOSSES)}")
        super().__init__(weight, names=[kind], name=kind)
        self.kind = kind
        self._handles: list = []

    def attach(self, student: nn.Module, teacher: nn.Module | None) -> None:
        base = student.get_base_model() if hasattr(student, "get_base_model") else student
        routers = router_modules(base)
        if not routers:
            raise BadInputError(f"--loss {self.kind} needs a model with routers (convert it with --to moe|bam)")
        scale = 1.0 / len(routers)

        def hook(top_k: int):
            def record(module, args, output):
                logits = output[0] if isinstance(output, tuple) else output
                logits = logits.reshape(-1, logits.shape[-1])
                value = balance_loss(logits, top_k) if self.kind == "balance" else z_loss(logits)
                emit_aux_loss(self.kind, value * scale)
            return record

        self._handles = [base.get_submodule(name).register_forward_hook(hook(k)) for name, k in routers]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
