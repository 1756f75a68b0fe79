"""``expected_attention``: Expected Attention (Devoto et al., 2025; kvpress ``ExpectedAttentionPress``) — compress
the prompt's KV cache once by the attention that *future* queries are expected to give each key.

After the prompt (the first call of a sequence; prefill itself is dense), every query head models its future
queries as a Gaussian: the mean ``mu`` and covariance ``S`` of the prompt's queries *before RoPE* (the first
``sinks`` queries left out), moved to the next ``future`` positions by the RoPE rotation averaged over them
(``R = mean_p R(p)``: ``mu -> R mu``, ``S -> R S R^T``). A key's expected score is then
``exp(k.mu * scale + 1/2 k^T S k * scale^2)`` (the mean of ``exp(q.k * scale)`` for Gaussian ``q``), normalised
over the keys, averaged over the query heads of a KV head (GQA: one kept set per KV head), and multiplied by the
norm of the key's value. The first ``sinks`` keys are always kept. Unlike ``snapkv`` nothing depends on the last
prompt tokens: the score is question-agnostic (kvpress's setting, where the question comes after compression).

Budget → units: ``tokens = budget.tokens(prompt length)`` KV entries per head (sinks included) for each row; a
budget at or above the prompt length evicts nothing (exactly dense). Decoded tokens are all kept. Needs a RoPE
model (pre-RoPE queries are recovered by rotating back); without :func:`~seqtool.patches.make_cache` nothing is
evicted and the method is dense.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from seqtool.errors import BadInputError, UnsupportedModelError
from seqtool.kernels._common import rope_rotate
from seqtool.patches.base import AttentionMethod, AttnCall
from seqtool.patches.registry import register_method
from seqtool.patches.selection import Selection
from seqtool.patches.snapkv import SnapKVCacheLayer, prompt_scored_select


def average_rotation(x: torch.Tensor, start: int, n: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """``x`` (..., D) times the RoPE rotation averaged over positions ``start .. start + n - 1`` (rotate-half
    layout): each dim pair ``(i, i + R/2)`` is mapped by ``[[c, -s], [s, c]]`` with ``c, s`` the mean cos / sin."""
    pos = torch.arange(start, start + n, dtype=torch.float64, device=x.device)
    ang = pos[:, None] * inv_freq.to(device=x.device, dtype=torch.float64)[None, :]
    c, s = ang.cos().mean(0).to(x.dtype), ang.sin().mean(0).to(x.dtype)
    half = inv_freq.numel()
    x1, x2 = x[..., :half], x[..., half:2 * half]
    out = x.clone()
    out[..., :half] = x1 * c - x2 * s
    out[..., half:2 * half] = x2 * c + x1 * s
    return out


def expected_scores(call: AttnCall, inv_freq: torch.Tensor, future: int, sinks: int, covariance: bool = True,
                    vnorm: bool = True) -> torch.Tensor:
    """``(b, Hkv, Tk)`` expected-attention key scores of a prefill call (queries end-aligned to the keys)."""
    b, hq, tq, d = call.q.shape
    hkv, tk = call.k.shape[1], call.tk
    pos = torch.arange(tk - tq, tk, device=call.q.device)
    q = rope_rotate(call.q.float(), -pos.view(1, 1, tq).expand(b, hq, tq), inv_freq)[:, :, min(sinks, tq - 1):]
    mu = q.mean(2)  # (b, Hq, D) pre-RoPE mean query
    mu_f = average_rotation(mu, tk, future, inv_freq)
    k = call.k.float().repeat_interleave(call.n_rep, 1)  # (b, Hq, Tk, D)
    logits = (k @ mu_f[..., None]).squeeze(-1) * call.scale
    if covariance:
        centred = q - mu[:, :, None]
        cov = centred.transpose(-1, -2) @ centred / q.shape[2]  # (b, Hq, D, D)
        # R S R^T: rotate the rows, then the columns (R acts on the last dim of a row vector as x -> R x)
        cov_f = average_rotation(average_rotation(cov, tk, future, inv_freq).transpose(-1, -2), tk, future, inv_freq)
        logits = logits + 0.5 * ((k @ cov_f) * k).sum(-1) * call.scale ** 2
    n_sink = min(sinks, tk)
    probs = torch.softmax(logits[..., n_sink:], -1).view(b, hkv, call.n_rep, tk - n_sink).mean(2)
    if vnorm:
        probs = probs * call.v[:, :, n_sink:].float().norm(dim=-1)
    top = probs.amax(-1, keepdim=True) + 1 if probs.shape[-1] else probs.new_ones(b, hkv, 1)
    return torch.cat([top.expand(b, hkv, n_sink), probs], -1)


@register_method
@dataclass
class ExpectedAttention(AttentionMethod):
    name: ClassVar[str] = "expected_attention"
    budget_units: ClassVar[str] = ("KV entries kept per head after the prompt: budget.tokens(prompt length), "
                                   "sinks included")
    window: ClassVar[int] = 0  # the shared cache layer protects no observation window

    budget: float | str | None = 0.25
    future: int = 512
    sinks: int = 4
    covariance: bool = True
    vnorm: bool = True

    def validate(self) -> None:
        if self.future < 1 or self.sinks < 0:
            raise BadInputError("expected_attention needs future >= 1 and sinks >= 0")

    def prepare(self, model: nn.Module) -> None:
        """Find the model's rotary module (its ``inv_freq`` is read at each call)."""
        self._rotary = next((m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)),
                            None)
        if self._rotary is None:
            raise UnsupportedModelError("expected_attention needs a RoPE model (pre-RoPE query statistics)")

    def select(self, call: AttnCall) -> Selection:
        inv_freq = self._rotary.inv_freq.float()
        return prompt_scored_select(self, call, lambda c: expected_scores(c, inv_freq, self.future, self.sinks,
                                                                           self.covariance, self.vnorm))

    def make_cache_layer(self, runtime: Any) -> SnapKVCacheLayer:
        return SnapKVCacheLayer(runtime, self)
