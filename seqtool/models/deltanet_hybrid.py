"""seqtool's own hybrid class: a Llama whose non-attention layers hold a recurrent mixer, chosen per layer.

``model_type`` ``seqtool_hybrid``; ``layer_types`` lists each layer's cache kind (``full_attention`` or
``linear_attention``), so transformers' ``DynamicCache`` gives the mixer layers a recurrent-state cache layer;
``mixer_types`` names each layer's mixer: ``attention``, ``deltanet`` (Gated DeltaNet, below) or ``linear``
(LoLCATs: Hedgehog linear attention + a softmax window, :mod:`seqtool.models.lolcats_mixer`). Registered with
``AutoConfig``/``AutoModelForCausalLM`` by :func:`seqtool.models.register` (called by ``seqtool.load`` and on
importing :mod:`seqtool.models`, never at ``import seqtool``); loading never needs ``trust_remote_code``.

Mixer (Gated DeltaNet, Yang et al. 2024, without the short conv and the output gate): per query head,
q = L2norm(SiLU(W_q x)), k = L2norm(SiLU(W_k x)), v = W_v x, beta = sigmoid(W_b x + b_b), gate
g = -exp(A_log) * softplus(W_a x + dt_bias), S_t = e^{g_t} S_{t-1} + beta_t k_t^T (v_t - e^{g_t} k_t S_{t-1}),
o_t = q_t S_t / sqrt(d); out = W_o o. Prefill / training run the chunked ``delta_rule_attn`` kernel op, decode
runs ``delta_rule_attn_step`` on the cached state.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from seqtool.kernels import delta_rule_attn, delta_rule_attn_step

MODEL_TYPE = "seqtool_hybrid"
ATTENTION, RECURRENT = "full_attention", "linear_attention"


MIXERS = ("deltanet", "linear")


class SeqtoolHybridConfig(LlamaConfig):
    """``layer_types``: the cache kind per layer (``full_attention`` / ``linear_attention``, what transformers'
    ``DynamicCache`` reads); ``mixer_types``: the mixer per layer (``attention``, ``deltanet``, ``linear``; the
    registry's per-layer kinds); ``linear_window``: the softmax window of ``linear`` mixers."""

    model_type = MODEL_TYPE
    layer_types: list | None = None
    mixer_types: list | None = None
    linear_window: int = 64

    def __post_init__(self, **kwargs):
        if self.layer_types is not None:  # an attention layer's mixer is "attention"; unnamed mixers are deltanet
            given = list(self.mixer_types or [None] * len(self.layer_types))
            self.mixer_types = ["attention" if kind == ATTENTION else (m or "deltanet")
                                for kind, m in zip(self.layer_types, given)]
        super().__post_init__(**kwargs)


class DeltaNetMixer(nn.Module):
    """Drop-in for a Llama attention module: ``forward(hidden_states, position_embeddings, attention_mask,
    past_key_values=None, **kw) -> (out (B, T, hidden), None)``; the state lives in the cache's layer."""

    def __init__(self, config: SeqtoolHybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads = config.num_attention_heads
        self.head_dim = config.head_dim or config.hidden_size // self.heads
        inner, hidden, bias = self.heads * self.head_dim, config.hidden_size, bool(config.attention_bias)
        self.q_proj = nn.Linear(hidden, inner, bias=bias)
        self.k_proj = nn.Linear(hidden, inner, bias=bias)
        self.v_proj = nn.Linear(hidden, inner, bias=bias)
        self.o_proj = nn.Linear(inner, hidden, bias=bias)
        self.b_proj = nn.Linear(hidden, self.heads, bias=True)
        self.a_proj = nn.Linear(hidden, self.heads, bias=False)
        self.A_log = nn.Parameter(torch.zeros(self.heads))
        self.dt_bias = nn.Parameter(torch.zeros(self.heads))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                past_key_values=None, **kwargs):
        cache = past_key_values if past_key_values is not None else kwargs.get("cache")
        q = F.normalize(F.silu(self._heads(self.q_proj(hidden_states))), dim=-1)
        k = F.normalize(F.silu(self._heads(self.k_proj(hidden_states))), dim=-1)
        v = self._heads(self.v_proj(hidden_states))
        beta = torch.sigmoid(self.b_proj(hidden_states)).transpose(1, 2)  # (B, H, T)
        g = (-torch.exp(self.A_log.float()) * F.softplus(self.a_proj(hidden_states).float() + self.dt_bias)).transpose(1, 2)
        state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None
        scale = self.head_dim ** -0.5
        if hidden_states.shape[1] == 1 and state is not None:
            out, state = delta_rule_attn_step(q, k, v, beta, state, log_decay=g, scale=scale)
        else:
            out, state = delta_rule_attn(q, k, v, beta, log_decay=g, initial_state=state, return_state=True,
                                         scale=scale)
        if cache is not None:
            cache.update_recurrent_state(state, layer_idx=self.layer_idx)
            # transformers marks a state as present only when a conv state is written; this mixer has no conv
            cache.layers[self.layer_idx].has_previous_state[0] = True
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1).to(hidden_states.dtype)), None


class SeqtoolHybridForCausalLM(LlamaForCausalLM):
    config_class = SeqtoolHybridConfig

    def __init__(self, config: SeqtoolHybridConfig):
        super().__init__(config)
        from seqtool.models.lolcats_mixer import LolcatsMixer

        classes = {"deltanet": DeltaNetMixer, "linear": LolcatsMixer}
        for i, (kind, mixer) in enumerate(zip(config.layer_types or [], config.mixer_types or [])):
            if kind == RECURRENT:
                self.model.layers[i].self_attn = classes[mixer](config, i)
        self.post_init()


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know ``seqtool_hybrid`` (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(MODEL_TYPE, SeqtoolHybridConfig)
        AutoModelForCausalLM.register(SeqtoolHybridConfig, SeqtoolHybridForCausalLM)
    except ValueError:  # already registered
        pass
