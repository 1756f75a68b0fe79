"""BAM (Branch-Attend-Mix): a decoder whose layers mix attention experts with a soft router and route FFN experts.

Each layer holds ``E = num_attention_experts`` attention experts. A soft router (``self_attn.router``, (E, hidden))
gives every token a softmax weight per expert; the layer's output is Σ_e w_e · o_e(attention_e(x)). All experts
run as ONE attention call with ``E × heads`` query heads, so the standard attention functions, masks and the
``DynamicCache`` work unchanged:

- full experts (``attention_kv_shared=False``): every expert has its own q/k/v/o. Query heads are ordered
  (expert, kv head, group) and K/V heads (expert, kv head), so GQA's ``head // groups`` pairs each query head with
  its own expert's K/V. The cache holds E experts' keys and values (E× the dense model's).
- K/V-shared experts (``attention_kv_shared=True``): experts have their own q/o and share one k/v. Query heads are
  ordered (kv head, expert, group) and ``groups = E × heads / kv_heads``. The cache is one expert's size.

``o_proj`` is (hidden, E·heads·head_dim) with columns in the query-head order; weighting each expert's attention
output by its router weight before ``o_proj`` is the same as mixing the experts' outputs. Per-head q/k norms
(qwen3 seeds) keep each expert's weights: ``q_norm.weight`` is (query heads, head_dim).

The FFN is Mixtral's sparse MoE block (top-k routing over ``num_local_experts`` fused experts), so router logits,
the load-balancing loss (``output_router_logits=True``) and ``generate`` come from transformers' Mixtral code.
``parallel_block=True`` computes attention and FFN from the same input: x + attn(ln1(x)) + ffn(ln2(x)).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from huggingface_hub.dataclasses import strict
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.mixtral.configuration_mixtral import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import (MixtralForCausalLM, MixtralModel, MixtralPreTrainedModel,
                                                          MixtralRMSNorm, MixtralRotaryEmbedding,
                                                          MixtralSparseMoeBlock, apply_rotary_pos_emb,
                                                          eager_attention_forward)

MODEL_TYPE = "seqtool_bam"


@strict
class SeqtoolBamConfig(MixtralConfig):
    """Mixtral's config plus the attention-expert settings (see the module docstring)."""

    model_type = MODEL_TYPE
    num_attention_experts: int = 2
    attention_kv_shared: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    parallel_block: bool = False


class HeadNorm(nn.Module):
    """RMSNorm over head_dim with one weight row per head: input (B, T, heads, D), weight (heads, D)."""

    def __init__(self, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, head_dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class BamAttention(nn.Module):
    """E attention experts run as one attention call and mixed by a soft router (shapes in the module docstring)."""

    def __init__(self, config: SeqtoolBamConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.experts = config.num_attention_experts
        self.kv_shared = config.attention_kv_shared
        self.head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.q_heads = self.experts * heads
        self.kv_heads_total = kv_heads if self.kv_shared else self.experts * kv_heads
        self.num_key_value_groups = self.q_heads // self.kv_heads_total
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.q_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads_total * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads_total * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.q_heads * self.head_dim, config.hidden_size, bias=False)
        self.router = nn.Linear(config.hidden_size, self.experts, bias=False)
        if config.qk_norm:
            self.q_norm = HeadNorm(self.q_heads, self.head_dim, config.rms_norm_eps)
            self.k_norm = HeadNorm(self.kv_heads_total, self.head_dim, config.rms_norm_eps)

    def expert_weights(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Soft routing weights (B, T, E), summing to 1 over experts."""
        return torch.softmax(self.router(hidden_states).float(), dim=-1).to(hidden_states.dtype)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, cache=None, **kwargs) -> tuple[torch.Tensor, None]:
        batch, seq = hidden_states.shape[:2]
        shape = (batch, seq, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        attend: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                 eager_attention_forward)
        out, _ = attend(self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                        scaling=self.scaling, sliding_window=self.config.sliding_window, **kwargs)
        # out: (B, T, E·heads, D) in query-head order; weight each expert's heads by its router weight.
        w = self.expert_weights(hidden_states)
        heads = self.config.num_attention_heads
        if self.kv_shared:  # heads ordered (kv head, expert, group)
            kv = self.config.num_key_value_heads
            out = out.reshape(batch, seq, kv, self.experts, heads // kv, self.head_dim) * w[:, :, None, :, None, None]
        else:  # heads ordered (expert, kv head, group)
            out = out.reshape(batch, seq, self.experts, heads * self.head_dim) * w[..., None]
        return self.o_proj(out.reshape(batch, seq, -1)), None


class BamDecoderLayer(nn.Module):
    """Attention experts + sparse FFN experts, sequential (pre-norm residual) or parallel."""

    def __init__(self, config: SeqtoolBamConfig, layer_idx: int):
        super().__init__()
        self.parallel = config.parallel_block
        self.self_attn = BamAttention(config, layer_idx)
        self.mlp = MixtralSparseMoeBlock(config)
        self.input_layernorm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                position_ids=None, cache=None, **kwargs) -> torch.Tensor:
        kwargs.pop("past_key_values", None)
        attn, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings=position_embeddings,
                                 attention_mask=attention_mask, position_ids=position_ids, cache=cache, **kwargs)
        if self.parallel:
            return hidden_states + attn + self.mlp(self.post_attention_layernorm(hidden_states))
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class SeqtoolBamPreTrainedModel(MixtralPreTrainedModel):
    config_class = SeqtoolBamConfig
    config: SeqtoolBamConfig
    _no_split_modules = ["BamDecoderLayer"]
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_compile_fullgraph = False
    _can_record_outputs = {
        "router_logits": MixtralPreTrainedModel._can_record_outputs["router_logits"],
        "hidden_states": BamDecoderLayer,
    }

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, HeadNorm):
            nn.init.ones_(module.weight)


class SeqtoolBamModel(SeqtoolBamPreTrainedModel, MixtralModel):
    def __init__(self, config: SeqtoolBamConfig):
        SeqtoolBamPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([BamDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MixtralRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class SeqtoolBamForCausalLM(SeqtoolBamPreTrainedModel, MixtralForCausalLM):
    def __init__(self, config: SeqtoolBamConfig):
        SeqtoolBamPreTrainedModel.__init__(self, config)
        self.model = SeqtoolBamModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_local_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()


__all__ = ["SeqtoolBamConfig", "SeqtoolBamForCausalLM", "SeqtoolBamModel", "BamAttention"]
