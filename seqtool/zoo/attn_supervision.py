"""Attention supervision for training the reference model.

Retrieval needs a head that, at each answer position, attends to the needle token the answer copies. Grown by
the answer loss alone such a head forms slowly (the key match is a composition of two heads). The training
loop can add an auxiliary loss ``-log p`` where ``p`` is one chosen head's attention probability, at the
position predicting an answer token, on the needle token it copies. The model stays a plain Llama; only
its training objective changes.
"""
from __future__ import annotations

import math

import torch


class HeadAttentionProbe:
    """Captures one decoder layer's attention input during the forward pass and scores one head.

    ``log_prob(copies)`` takes ``copies`` (n, 3) = (row, query position, key position) and returns (n,) the
    log attention probability of head ``head`` at (row, query) on that key (causal softmax, RoPE applied as
    in the model). Call it after a forward pass of the batch the positions refer to.
    """

    def __init__(self, model, layer: int, head: int):
        cfg = model.config
        if not 0 <= layer < cfg.num_hidden_layers or not 0 <= head < cfg.num_attention_heads:
            raise ValueError(f"attention supervision wants layer < {cfg.num_hidden_layers} and "
                             f"head < {cfg.num_attention_heads}, got layer {layer}, head {head}")
        self.attn = model.model.layers[layer].self_attn
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.head = head
        self.kv_head = head // (cfg.num_attention_heads // cfg.num_key_value_heads)
        self._captured: tuple | None = None
        self._hook = self.attn.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self._captured = (hidden, kwargs["position_embeddings"])

    def log_prob(self, copies: torch.Tensor) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        if self._captured is None:
            raise RuntimeError("run a forward pass before log_prob")
        hidden, (cos, sin) = self._captured
        d, h, g = self.head_dim, self.head, self.kv_head
        wq = self.attn.q_proj.weight[h * d:(h + 1) * d]
        wk = self.attn.k_proj.weight[g * d:(g + 1) * d]
        q = (hidden @ wq.T).unsqueeze(2)  # (B, T, 1, d)
        k = (hidden @ wk.T).unsqueeze(2)
        if self.attn.q_proj.bias is not None:
            q = q + self.attn.q_proj.bias[h * d:(h + 1) * d]
            k = k + self.attn.k_proj.bias[g * d:(g + 1) * d]
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        q, k = q.squeeze(2).float(), k.squeeze(2).float()  # (B, T, d)
        out = []
        for row in copies[:, 0].unique().tolist():
            sel = copies[copies[:, 0] == row]
            scores = q[row, sel[:, 1]] @ k[row].T / math.sqrt(d)  # (n_row, T)
            future = torch.arange(k.shape[1], device=k.device)[None, :] > sel[:, 1:2]
            logp = scores.masked_fill(future, float("-inf")).log_softmax(-1)
            out.append(logp.gather(1, sel[:, 2:3]).squeeze(1))
        return torch.cat(out) if out else hidden.new_zeros(0)

    def remove(self) -> None:
        self._hook.remove()
