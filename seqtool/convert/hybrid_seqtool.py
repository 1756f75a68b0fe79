"""Llama-shaped model → seqtool's ``SeqtoolHybridForCausalLM`` with Gated DeltaNet (``deltanet``) or LoLCATs
(``linear``) mixers in the converted layers.

The class is a Llama (exact when every layer is kept: the same modules and weights). A converted layer's mixer
reads its attention weights the way the Mamba2 initialisation does (:mod:`seqtool.convert.hybrid_native`):
q ← Q, k ← K and v ← V (KV heads repeated over the query heads that shared them), o ← O; the write strength
beta starts at 0.5 (``b_proj`` zero weights and bias) and the decay gate at exp(-A·dt) with A uniform in [1, 16] and
dt log-uniform in [1e-3, 1e-1] (``a_proj`` zero, so the gate starts input-independent). A ``linear`` mixer keeps
q/k/v/o likewise; its Hedgehog feature maps start as the identity map followed by the ±softmax, its window
factors at sigmoid(0) = 1/2 (:mod:`seqtool.models.lolcats_mixer`).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from seqtool.arch.registry import decoder_layers, get_family, head_counts
from seqtool.convert.hybrid_native import A_RANGE, DT_FLOOR, DT_RANGE, _has_attention_bias, _repeat_heads
from seqtool.convert.layout import read_attention, read_mlp


@torch.no_grad()
def build_seqtool_hybrid(model: nn.Module, attention_layers: list[int], *, mixer: str = "deltanet",
                         seed: int = 0, window: int = 64) -> nn.Module:
    """A SeqtoolHybridForCausalLM holding ``model``'s weights; layers outside ``attention_layers`` get ``mixer``
    (``window``: the softmax window of ``linear`` mixers).
    Same device and dtype as ``model``, which is not modified."""
    from seqtool import recipe as recipe_mod
    from seqtool.models import SeqtoolHybridConfig, SeqtoolHybridForCausalLM

    src, spec = model.config, get_family(model)
    heads, kv_heads, head_dim = head_counts(src)
    layers = decoder_layers(model)
    n = len(layers)
    first = read_attention(getattr(layers[0], spec.attention), spec, heads, head_dim)
    rope = dict(getattr(src, "rope_parameters", None) or {"rope_type": "default",
                                                             "rope_theta": getattr(src, "rope_theta", 10000.0)})
    config = SeqtoolHybridConfig(
        vocab_size=src.vocab_size, hidden_size=src.hidden_size,
        intermediate_size=int(getattr(src, spec.config_keys["intermediate"])), num_hidden_layers=n,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, hidden_act=src.hidden_act,
        max_position_embeddings=src.max_position_embeddings, rms_norm_eps=src.rms_norm_eps,
        initializer_range=getattr(src, "initializer_range", 0.02), rope_parameters=rope,
        attention_bias=_has_attention_bias(first), mlp_bias=False, tie_word_embeddings=bool(src.tie_word_embeddings),
        pad_token_id=src.pad_token_id, bos_token_id=src.bos_token_id, eos_token_id=src.eos_token_id,
        layer_types=["full_attention" if i in attention_layers else "linear_attention" for i in range(n)],
        mixer_types=["attention" if i in attention_layers else mixer for i in range(n)], linear_window=window,
    )
    param = next(model.parameters())
    with torch.device(param.device):
        hybrid = SeqtoolHybridForCausalLM(config).to(param.dtype)
    hybrid.eval()
    hybrid.model.embed_tokens.weight.copy_(model.get_submodule(spec.embed).weight)
    hybrid.model.norm.weight.copy_(model.get_submodule(spec.final_norm).weight)
    if not config.tie_word_embeddings:
        hybrid.lm_head.weight.copy_(model.get_submodule(spec.lm_head).weight)
    rep = heads // kv_heads
    for i, (s, d) in enumerate(zip(layers, hybrid.model.layers)):
        for src_norm, dst_norm in zip(spec.norms, ("input_layernorm", "post_attention_layernorm")):
            getattr(d, dst_norm).weight.copy_(getattr(s, src_norm).weight)
        mlp = read_mlp(getattr(s, spec.mlp), spec)
        d.mlp.gate_proj.weight.copy_(mlp.gate)
        d.mlp.up_proj.weight.copy_(mlp.up)
        d.mlp.down_proj.weight.copy_(mlp.down)
        w = read_attention(getattr(s, spec.attention), spec, heads, head_dim)
        converted = i not in attention_layers
        r = rep if converted else 1
        for name, weight, bias in (("q_proj", w.q, w.q_bias), ("k_proj", w.k, w.k_bias), ("v_proj", w.v, w.v_bias),
                                   ("o_proj", w.o, w.o_bias)):
            lin = getattr(d.self_attn, name)
            lin.weight.copy_(_repeat_heads(weight, r, head_dim) if name in ("k_proj", "v_proj") else weight)
            if lin.bias is not None:
                if bias is None:
                    lin.bias.zero_()
                else:
                    lin.bias.copy_(_repeat_heads(bias, r, head_dim) if name in ("k_proj", "v_proj") else bias)
        if converted and mixer == "deltanet":
            _init_gates(d.self_attn, torch.Generator().manual_seed(seed * 1000 + i))
    recipe_mod.write(hybrid.config, recipe_mod.read(model.config))
    hybrid.generation_config = model.generation_config
    return hybrid


def _init_gates(mixer: nn.Module, gen: torch.Generator) -> None:
    heads = mixer.heads
    mixer.b_proj.weight.zero_()
    mixer.b_proj.bias.zero_()
    mixer.a_proj.weight.zero_()
    u = torch.rand(heads, generator=gen, dtype=torch.float64)
    dt = torch.exp(u * (math.log(DT_RANGE[1]) - math.log(DT_RANGE[0])) + math.log(DT_RANGE[0])).clamp(min=DT_FLOOR)
    mixer.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    a = torch.rand(heads, generator=gen, dtype=torch.float64) * (A_RANGE[1] - A_RANGE[0]) + A_RANGE[0]
    mixer.A_log.copy_(torch.log(a))
