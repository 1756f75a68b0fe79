"""Llama-shaped model → native transformers ``GraniteMoeHybridForCausalLM`` with Mamba2 in the converted layers.

With every layer kept as attention the result is the source model exactly (the config recipe below: RoPE,
``attention_multiplier = head_dim ** -0.5``, all multipliers 1, no experts, the shared MLP holding the dense MLP).
A converted layer gets a Mamba2 mixer initialised from its attention weights as in Mamba-in-the-Llama
(Wang et al. 2024): the SSM's input ``x`` from V, ``B`` from K, ``C`` from Q (a linear-attention reading of the
SSM: ``y_t = Σ_s C_t·B_s · decay(s, t) · x_s``), ``out_proj`` from O; one Mamba head per query head with
``head_dim`` channels and a ``head_dim``-sized state, one B/C group per head (K and V rows repeated over the
query heads that shared them: GQA). ``dt`` (softplus of ``dt_bias``) is log-uniform in [1e-3, 1e-1] and ``A`` uniform
in [1, 16] as in the paper; ``D = 1``; the gate ``z`` and ``dt`` projections keep a default random init.
The depthwise conv starts as the identity (last tap 1) so that, at step 0, ``x``/``B``/``C`` are exactly
SiLU(V/K/Q) instead of a random mix of four positions (the reference leaves the conv random).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from seqtool.arch.registry import decoder_layers, get_family, head_counts
from seqtool.convert.layout import AttnWeights, read_attention, read_mlp
from seqtool.errors import UnsupportedModelError

NATIVE_MODEL_TYPE = "granitemoehybrid"
DT_RANGE = (1e-3, 1e-1)
DT_FLOOR = 1e-4
A_RANGE = (1.0, 16.0)


def native_problems(model: nn.Module, *, mamba: bool = True) -> list[str]:
    """Why ``model`` cannot be rewritten exactly into GraniteMoeHybrid (``mamba``) or into seqtool's Llama-based
    hybrid class (empty list: it can)."""
    config = model.config
    spec = get_family(model)
    heads, _, head_dim = head_counts(config)
    hidden = int(config.hidden_size)
    problems = []
    if spec.qk_norms:
        problems.append("q/k norms (GraniteMoeHybrid attention has none)")
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    if any("sliding" in str(t) for t in layer_types) or (window and getattr(config, "use_sliding_window", True)):
        problems.append(f"a sliding window of {window} tokens (GraniteMoeHybrid attends to everything)")
    rope = getattr(config, "rope_parameters", None) or {}
    if float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        problems.append("partial rotary embeddings")
    mlp = read_mlp(getattr(decoder_layers(model)[0], spec.mlp), spec)
    if any(b is not None for b in (mlp.gate_bias, mlp.up_bias, mlp.down_bias)):
        problems.append("MLP biases (GraniteMoeHybrid's MLP has none)")
    if mamba and (heads * head_dim) % hidden:
        problems.append(f"heads x head_dim = {heads * head_dim} is not a multiple of hidden {hidden} (mamba_expand must "
                        "be an integer)")
    return problems


def check_native(model: nn.Module, mixer: str = "mamba2") -> None:
    """One-line error when the target class cannot reproduce ``model`` exactly."""
    problems = native_problems(model, mamba=mixer == "mamba2")
    if problems:
        target = "the native GraniteMoeHybrid class" if mixer == "mamba2" else "seqtool's Llama-based hybrid class"
        raise UnsupportedModelError(
            f"--mixer {mixer} writes {target}, which cannot reproduce this {model.config.model_type} model exactly: "
            f"{'; '.join(problems)}"
        )


def _has_attention_bias(w: AttnWeights) -> bool:
    return any(b is not None for b in (w.q_bias, w.k_bias, w.v_bias, w.o_bias))


def native_config(model: nn.Module, attention_layers: list[int]) -> Any:
    """The GraniteMoeHybridConfig of the hybrid (layers not in ``attention_layers`` are Mamba2)."""
    from transformers import GraniteMoeHybridConfig

    src = model.config
    spec = get_family(model)
    heads, kv_heads, head_dim = head_counts(src)
    n_layers = len(decoder_layers(model))
    first = read_attention(getattr(decoder_layers(model)[0], spec.attention), spec, heads, head_dim)
    bias = _has_attention_bias(first)
    hidden = int(src.hidden_size)
    rope = dict(getattr(src, "rope_parameters", None) or {"rope_type": "default",
                                                             "rope_theta": getattr(src, "rope_theta", 10000.0)})
    config = GraniteMoeHybridConfig(
        vocab_size=src.vocab_size, hidden_size=hidden, intermediate_size=int(getattr(src, spec.config_keys["intermediate"])),
        shared_intermediate_size=int(getattr(src, spec.config_keys["intermediate"])),
        num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        hidden_act=src.hidden_act, max_position_embeddings=src.max_position_embeddings,
        initializer_range=getattr(src, "initializer_range", 0.02), rms_norm_eps=src.rms_norm_eps,
        pad_token_id=src.pad_token_id, bos_token_id=src.bos_token_id, eos_token_id=src.eos_token_id,
        tie_word_embeddings=bool(src.tie_word_embeddings), rope_parameters=rope, attention_bias=bias,
        attention_dropout=float(getattr(src, "attention_dropout", 0.0) or 0.0),
        embedding_multiplier=1.0, logits_scaling=1.0, residual_multiplier=1.0, attention_multiplier=head_dim ** -0.5,
        num_local_experts=0, position_embedding_type="rope",
        layer_types=["attention" if i in attention_layers else "mamba" for i in range(n_layers)],
        mamba_n_heads=heads, mamba_d_head=head_dim, mamba_expand=heads * head_dim // hidden, mamba_n_groups=heads,
        mamba_d_state=head_dim, mamba_proj_bias=bias,
    )
    config.dtype = next(model.parameters()).dtype
    return config


def _copy(dst: torch.Tensor, src: torch.Tensor | None) -> None:
    if src is None:
        dst.zero_()
    else:
        dst.copy_(src.to(dst.dtype))


def _repeat_heads(w: torch.Tensor, n_rep: int, head_dim: int) -> torch.Tensor:
    """(Hkv*D, ...) → (Hkv*n_rep*D, ...): each KV head's rows repeated for the query heads that share it."""
    blocks = w.reshape(-1, head_dim, *w.shape[1:])
    return blocks.repeat_interleave(n_rep, dim=0).reshape(-1, *w.shape[1:])


@torch.no_grad()
def init_mamba_from_attention(mamba: nn.Module, w: AttnWeights, heads: int, kv_heads: int, head_dim: int,
                              generator: torch.Generator) -> None:
    """Fill a GraniteMoeHybridMambaLayer from one attention layer's projections (module docstring)."""
    d_inner = heads * head_dim
    rep = heads // kv_heads
    dev, dtype = mamba.in_proj.weight.device, mamba.in_proj.weight.dtype
    hidden = mamba.in_proj.weight.shape[1]

    def rand_uniform(shape, low, high):
        return (torch.rand(shape, generator=generator, dtype=torch.float64) * (high - low) + low)

    bound = 1.0 / math.sqrt(hidden)  # nn.Linear's default range, drawn from our own generator (reproducible)
    z = rand_uniform((d_inner, hidden), -bound, bound)
    dt_rows = rand_uniform((heads, hidden), -bound, bound)
    # in_proj rows: [z | x | B | C | dt]
    weight = torch.cat([z.to(dtype), _repeat_heads(w.v.cpu(), rep, head_dim).to(dtype),
                        _repeat_heads(w.k.cpu(), rep, head_dim).to(dtype), w.q.cpu().to(dtype), dt_rows.to(dtype)])
    mamba.in_proj.weight.copy_(weight.to(dev))
    if mamba.in_proj.bias is not None:
        zeros = torch.zeros(d_inner, dtype=dtype)
        vb = zeros if w.v_bias is None else _repeat_heads(w.v_bias.cpu(), rep, head_dim).to(dtype)
        kb = zeros if w.k_bias is None else _repeat_heads(w.k_bias.cpu(), rep, head_dim).to(dtype)
        qb = zeros if w.q_bias is None else w.q_bias.cpu().to(dtype)
        mamba.in_proj.bias.copy_(torch.cat([zeros, vb, kb, qb, torch.zeros(heads, dtype=dtype)]).to(dev))
    conv = mamba.conv1d
    conv.weight.zero_()
    conv.weight[:, 0, -1] = 1.0
    if conv.bias is not None:
        conv.bias.zero_()
    log_lo, log_hi = math.log(DT_RANGE[0]), math.log(DT_RANGE[1])
    dt = torch.exp(rand_uniform((heads,), log_lo, log_hi)).clamp(min=DT_FLOOR)
    mamba.dt_bias.copy_((dt + torch.log(-torch.expm1(-dt))).to(dev, mamba.dt_bias.dtype))  # softplus⁻¹(dt)
    mamba.A_log.copy_(torch.log(rand_uniform((heads,), *A_RANGE)).to(dev, mamba.A_log.dtype))
    mamba.D.fill_(1.0)
    mamba.norm.weight.fill_(1.0)
    mamba.out_proj.weight.copy_(w.o.to(dev, dtype))
    if mamba.out_proj.bias is not None:
        _copy(mamba.out_proj.bias, w.o_bias)


@torch.no_grad()
def build_native_hybrid(model: nn.Module, attention_layers: list[int], *, seed: int = 0) -> nn.Module:
    """A GraniteMoeHybridForCausalLM holding ``model``'s weights; layers outside ``attention_layers`` are Mamba2
    initialised from their attention. Same device and dtype as ``model``; ``model`` is not modified."""
    from transformers import AutoModelForCausalLM

    from seqtool import recipe as recipe_mod

    spec = get_family(model)
    heads, kv_heads, head_dim = head_counts(model.config)
    config = native_config(model, attention_layers)
    param = next(model.parameters())
    with torch.device(param.device):
        hybrid = AutoModelForCausalLM.from_config(config, dtype=param.dtype)
    hybrid.eval()
    src_layers, dst_layers = decoder_layers(model), hybrid.model.layers
    hybrid.model.embed_tokens.weight.copy_(model.get_submodule(spec.embed).weight)
    hybrid.model.norm.weight.copy_(model.get_submodule(spec.final_norm).weight)
    if not config.tie_word_embeddings:
        hybrid.lm_head.weight.copy_(model.get_submodule(spec.lm_head).weight)
    for i, (src, dst) in enumerate(zip(src_layers, dst_layers)):
        for src_norm, dst_norm in zip(spec.norms, ("input_layernorm", "post_attention_layernorm")):
            getattr(dst, dst_norm).weight.copy_(getattr(src, src_norm).weight)
        mlp = read_mlp(getattr(src, spec.mlp), spec)
        dst.shared_mlp.input_linear.weight.copy_(torch.cat([mlp.gate, mlp.up]))
        dst.shared_mlp.output_linear.weight.copy_(mlp.down)
        w = read_attention(getattr(src, spec.attention), spec, heads, head_dim)
        if dst.self_attn is not None:
            attn = dst.self_attn
            for name, weight, bias in (("q_proj", w.q, w.q_bias), ("k_proj", w.k, w.k_bias),
                                       ("v_proj", w.v, w.v_bias), ("o_proj", w.o, w.o_bias)):
                getattr(attn, name).weight.copy_(weight)
                if getattr(attn, name).bias is not None:
                    _copy(getattr(attn, name).bias, bias)
        else:
            gen = torch.Generator().manual_seed(seed * 1000 + i)
            init_mamba_from_attention(dst.mamba, w, heads, kv_heads, head_dim, gen)
    recipe_mod.write(hybrid.config, recipe_mod.read(model.config))
    hybrid.generation_config = model.generation_config
    return hybrid
