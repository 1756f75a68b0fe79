"""Prefill FLOP counts: 2·params·tokens for the matmuls plus dense causal attention.

Conventions (stated so numbers can be compared with other tools):
- ``layer_params``: 2-D weights inside the decoder layers (q/k/v/o or fused qkv, MLP projections); every
  prefill token passes through each once, costing 2 FLOPs per weight (multiply + add). Biases and norms
  are elementwise and left out.
- ``lm_head_params``: the output projection, applied only where logits are computed (seqtool's prefill keeps
  the last position's logits, like ``generate``).
- attention: FlashAttention's count for causal attention: QKᵀ and PV are 2·T²·D FLOPs each per head,
  halved for the causal mask → ``2 · B · Hq · T² · D`` per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from seqtool.arch.registry import config_value, decoder_layers, get_family, head_counts, layer_kinds


@dataclass(frozen=True)
class FlopShape:
    """What the FLOP formula needs from a model."""

    layer_params: int
    lm_head_params: int
    layers: int
    heads: int
    head_dim: int


def flop_shape(model: nn.Module) -> FlopShape:
    """Read the FLOP-relevant sizes of ``model`` (works on meta models). Routed experts count with their active
    share (top_k / experts); attention experts multiply the heads (all of them run)."""
    spec = get_family(model)
    kinds = layer_kinds(model.config)
    layer_params = 0
    for layer, kind in zip(decoder_layers(model), kinds):
        experts = getattr(layer, spec.mlp).get_submodule(spec.moe.experts) if kind.ffn == "moe" else None
        expert_ids = {id(p) for p in experts.parameters()} if experts is not None else set()
        layer_params += sum(p.numel() for p in layer.parameters() if p.dim() == 2 and id(p) not in expert_ids)
        if experts is not None:
            layer_params += sum(p.numel() for p in experts.parameters()) * kind.top_k // kind.experts
    lm_head = model.get_submodule(spec.lm_head)
    heads, _, head_dim = head_counts(model.config)
    heads *= max(kind.attention_experts for kind in kinds)
    return FlopShape(layer_params=layer_params, lm_head_params=lm_head.weight.numel(),
                     layers=int(config_value(model.config, "layers")), heads=heads, head_dim=head_dim)


def attention_flops(batch: int, seq_len: int, heads: int, head_dim: int, layers: int, *, causal: bool = True) -> int:
    """Dense attention FLOPs over all layers: 4·B·H·T²·D per layer, halved when causal (FlashAttention's count)."""
    full = 4 * batch * heads * seq_len * seq_len * head_dim * layers
    return full // 2 if causal else full


def prefill_flops(shape: FlopShape, batch: int, seq_len: int, *, logits_positions: int = 1) -> int:
    """FLOPs of one prefill of ``batch × seq_len`` tokens with logits at ``logits_positions`` per sequence."""
    matmul = 2 * shape.layer_params * batch * seq_len
    head = 2 * shape.lm_head_params * batch * logits_positions
    return matmul + head + attention_flops(batch, seq_len, shape.heads, shape.head_dim, shape.layers)


def achieved_tflops(flops: int, seconds: float) -> float:
    """TFLOP/s achieved when ``flops`` took ``seconds``."""
    return flops / seconds / 1e12 if seconds and seconds > 0 else float("nan")
