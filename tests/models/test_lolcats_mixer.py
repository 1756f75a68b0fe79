"""LoLCATs mixer: the blocked window + chunked linear form equals the quadratic definition, and feeding the tokens
in pieces (prefill then one at a time, or two chunks) carrying the state equals one pass."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from seqtool.models.lolcats_mixer import LolcatsMixer


def _mixer(window: int) -> LolcatsMixer:
    torch.manual_seed(0)
    cfg = SimpleNamespace(num_attention_heads=2, head_dim=8, hidden_size=16, attention_bias=False,
                          linear_window=window)
    mixer = LolcatsMixer(cfg, 0)
    with torch.no_grad():  # away from the identity init, so the feature maps and factors matter
        mixer.window_factor.normal_()
        mixer.feature_q.weight.add_(0.3 * torch.randn_like(mixer.feature_q.weight))
        mixer.feature_k.weight.add_(0.3 * torch.randn_like(mixer.feature_k.weight))
    return mixer


def _quadratic(mixer: LolcatsMixer, q, k, v):
    """y_t = (Σ_window f·exp(s − max) v + Σ_older φq·φk v) / (same sums without v), as T × T matrices."""
    T, d, W = q.shape[2], q.shape[3], mixer.window
    t = torch.arange(T)
    in_window = (t[None] <= t[:, None]) & (t[None] > t[:, None] - W)
    older = t[None] <= t[:, None] - W
    s = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~in_window, float("-inf"))
    a = torch.exp(s - s.amax(-1, keepdim=True)) * torch.sigmoid(mixer.window_factor)[:, None, None]
    b = (mixer.feature_q(q) @ mixer.feature_k(k).transpose(-1, -2)) * older
    return ((a + b) @ v) / (a + b).sum(-1, keepdim=True)


@torch.no_grad()
@pytest.mark.parametrize("window,T", [(4, 11), (4, 8), (16, 9), (1, 5)])
def test_blocked_form_equals_quadratic_and_pieces_equal_one_pass(window, T):
    mixer = _mixer(window)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, T, 8, generator=g) for _ in range(3))
    full, state = mixer.attend(q, k, v, None)
    torch.testing.assert_close(full, _quadratic(mixer, q, k, v), rtol=1e-5, atol=1e-5)
    for split in (1, 3, T - 1):  # prefill of `split` tokens, then token by token
        out, st = mixer.attend(q[:, :, :split], k[:, :, :split], v[:, :, :split], None)
        outs = [out]
        for t in range(split, T):
            out, st = mixer.attend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], st)
            outs.append(out)
        torch.testing.assert_close(torch.cat(outs, 2), full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(st, state, rtol=1e-5, atol=1e-5)
    a, st = mixer.attend(q[:, :, :T // 2], k[:, :, :T // 2], v[:, :, :T // 2], None)  # two chunks
    b, st = mixer.attend(q[:, :, T // 2:], k[:, :, T // 2:], v[:, :, T // 2:], st)
    torch.testing.assert_close(torch.cat([a, b], 2), full, rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_feature_maps_and_factors():
    mixer = _mixer(2)
    x = torch.randn(1, 7, 16)
    out, _ = mixer(x)
    out.square().sum().backward()
    for p in (mixer.feature_q.weight, mixer.feature_k.weight, mixer.window_factor, mixer.q_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
