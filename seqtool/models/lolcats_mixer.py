"""LoLCATs-style mixer: a sliding window of softmax attention plus Hedgehog linear attention for everything older,
mixed per head under one shared normaliser (Zhang et al., "LoLCATs", 2024; Hedgehog feature map: Zhang et al. 2024).

For query t (RoPE'd q_t, k_s as in the attention it replaces), window W, per head h:

    a_ts = f_h · exp(q_t·k_s/√d − m_t)   for t−W < s ≤ t      (m_t: the max score in the window)
    b_ts = φ_q(q_t) · φ_k(k_s)           for s ≤ t−W
    y_t  = (Σ_s a_ts v_s + Σ_s b_ts v_s) / (Σ_s a_ts + Σ_s b_ts)

f_h = sigmoid(window_factor_h) (learnable, per head); φ(x) = [softmax(x W_h), softmax(−x W_h)] with a learnable
W_h (d × d, identity at init; separate maps for q and k). The linear part runs on the chunked
``gated_linear_attn`` op (no decay): keys and values enter its state W tokens late, and a column of ones
appended to v carries the normaliser Σ b_ts.

Recurrent state (decode; one fp32 tensor per layer, fixed shape (B, H, F + 2W, d + 1), F = 2d): rows [0, F) the
linear state Σ φ_k(k_s)^T [v_s, 1] of the tokens that have left the window; rows [F, F+W) the window's keys
(last column 1 where the slot holds a token), rows [F+W, F+2W) its values; the newest token is last.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqtool.kernels import gated_linear_attn


class HedgehogFeatureMap(nn.Module):
    """φ(x) = [softmax(x W_h), softmax(−x W_h)] per head; x (B, H, T, d) → (B, H, T, 2d). W_h starts as I."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(head_dim).repeat(heads, 1, 1))  # (H, d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("bhtd,hdf->bhtf", x.float(), self.weight.float())
        return torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], -1)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, offset: int,
                     factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The window's terms, blocked so the cost is O(T·W): for each query, Σ_s a_ts v_s and Σ_s a_ts over its
    window (s in (t − W, t]) with a_ts = factor_h · exp(q_t·k_s/√d − max_s).

    q (B, H, Tq, d); k, v (B, H, Tk, d) with Tk = offset + Tq (query i sits at key index offset + i); factor (H,).
    Returns (num (B, H, Tq, d), den (B, H, Tq, 1)), fp32."""
    B, H, Tq, d = q.shape
    Tk = k.shape[2]
    n = -(-Tk // window)
    # align queries with keys (pad the front by offset), pad to n·W, and give each block one window of history
    qa = F.pad(q.float(), (0, 0, offset, n * window - Tk)).view(B, H, n, window, d)
    ka = F.pad(k.float(), (0, 0, window, n * window - Tk)).unfold(2, 2 * window, window).transpose(-1, -2)
    va = F.pad(v.float(), (0, 0, window, n * window - Tk)).unfold(2, 2 * window, window).transpose(-1, -2)
    s = torch.einsum("bhcid,bhcjd->bhcij", qa, ka) * d ** -0.5          # (B, H, n, W, 2W): keys [cW−W, cW+W)
    i = torch.arange(window, device=q.device)[:, None]
    j = torch.arange(2 * window, device=q.device)[None, :]
    key_pos = torch.arange(n, device=q.device)[:, None, None] * window - window + j
    keep = (j > i) & (j <= i + window) & (key_pos >= 0)                  # key in (query − W, query], not padding
    s = s.masked_fill(~keep, float("-inf"))
    a = torch.exp(s - s.amax(-1, keepdim=True)) * factor.float()[:, None, None, None]
    num = torch.einsum("bhcij,bhcjd->bhcid", a, va).reshape(B, H, n * window, d)
    den = a.sum(-1).reshape(B, H, n * window, 1)
    return num[:, :, offset:offset + Tq], den[:, :, offset:offset + Tq]


class LolcatsMixer(nn.Module):
    """Drop-in for a Llama attention module (same call as :class:`~seqtool.models.deltanet_hybrid.DeltaNetMixer`):
    q/k/v/o projections (K/V with one head per query head), RoPE, window ``config.linear_window``."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads = config.num_attention_heads
        self.head_dim = config.head_dim or config.hidden_size // self.heads
        self.window = int(getattr(config, "linear_window", None) or 64)
        inner, hidden, bias = self.heads * self.head_dim, config.hidden_size, bool(config.attention_bias)
        self.q_proj = nn.Linear(hidden, inner, bias=bias)
        self.k_proj = nn.Linear(hidden, inner, bias=bias)
        self.v_proj = nn.Linear(hidden, inner, bias=bias)
        self.o_proj = nn.Linear(inner, hidden, bias=bias)
        self.feature_q = HedgehogFeatureMap(self.heads, self.head_dim)
        self.feature_k = HedgehogFeatureMap(self.heads, self.head_dim)
        self.window_factor = nn.Parameter(torch.zeros(self.heads))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def state_rows(self) -> int:
        return 2 * self.head_dim + 2 * self.window

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                past_key_values=None, **kwargs):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        cache = past_key_values if past_key_values is not None else kwargs.get("cache")
        q, k = self._heads(self.q_proj(hidden_states)), self._heads(self.k_proj(hidden_states))
        v = self._heads(self.v_proj(hidden_states))
        if position_embeddings is not None:
            q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None
        with torch.autocast(hidden_states.device.type, enabled=False):  # the normaliser wants fp32
            out, new_state = self.attend(q.float(), k.float(), v.float(), state)
        if cache is not None:
            cache.update_recurrent_state(new_state, layer_idx=self.layer_idx)
            cache.layers[self.layer_idx].has_previous_state[0] = True  # no conv state marks it (as DeltaNetMixer)
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1).to(hidden_states.dtype)), None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k, v (B, H, T, d) fp32 (RoPE applied); state None or (B, H, F + 2W, d + 1). Returns
        (out (B, H, T, d) fp32, new state)."""
        B, H, T, d = q.shape
        W, Fd = self.window, 2 * d
        if state is None:
            lin, m = None, 0
            k_all, v_all = k, v
        else:
            lin = state[:, :, :Fd]
            valid = state[0, 0, Fd:Fd + W, d] > 0
            m = int(valid.sum())
            k_all = torch.cat([state[:, :, Fd + W - m:Fd + W, :d], k], 2)   # the window's last m tokens, then new
            v_all = torch.cat([state[:, :, Fd + 2 * W - m:, :d], v], 2)
        # 1. the window: softmax terms, max-shifted per query, times the head's factor
        num, den = window_attention(q, k_all, v_all, W, m, torch.sigmoid(self.window_factor.float()))
        # 2. older tokens: key index m + t − W enters the linear state at query t
        fk = self.feature_k(k_all)                                            # (B, H, m + T, F)
        kv = torch.cat([v_all, torch.ones_like(v_all[..., :1])], -1)          # (B, H, m + T, d + 1)
        fk_in = F.pad(fk, (0, 0, W - m, 0))[:, :, :T]                         # m <= W: the first W − m get none
        kv_in = F.pad(kv, (0, 0, W - m, 0))[:, :, :T]
        fq = self.feature_q(q)
        zeros = q.new_zeros(B, H, T)
        lin_out, lin_state = gated_linear_attn(fq, fk_in.contiguous(), kv_in.contiguous(), zeros,
                                               initial_state=lin, return_state=True)
        num = num + lin_out[..., :d]
        den = den + lin_out[..., d:]
        out = num / den
        # 3. the new state: the linear part, and the last min(W, m + T) tokens in the window slots
        keep = min(W, m + T)
        win = q.new_zeros(B, H, 2 * W, d + 1)
        win[:, :, W - keep:W, :d] = k_all[:, :, -keep:]
        win[:, :, W - keep:W, d] = 1.0
        win[:, :, 2 * W - keep:, :d] = v_all[:, :, -keep:]
        return out, torch.cat([lin_state, win], 2)
