"""SnapKV and H2O: the kept set follows the scores each method promises, the KV cache really shrinks to the
budget per KV head, and a budget at or above the prompt length is exactly dense."""
from __future__ import annotations

import pytest
import torch

from seqtool.patches import apply_patch, make_cache
from seqtool.patches.base import AttnCall
from seqtool.patches.h2o import H2O, H2OCacheLayer
from seqtool.patches.snapkv import SnapKV, SnapKVCacheLayer

from .helpers import tiny


def _planted(t=96, d=8, hkv=2, g=2, hot=10):
    """Queries of the last 8 positions (every head) attend key ``hot`` almost only."""
    torch.manual_seed(0)
    q = torch.randn(1, hkv * g, t, d) * 0.1
    k = torch.randn(1, hkv, t, d) * 0.1
    k[0, :, hot, 0] = 30.0
    q[0, :, -8:, 0] = 1.0
    return q, k


def _prefill(method, layer, q, k):
    layer.update(k, k)
    call = AttnCall(q, layer.keys, layer.values, 1.0, 0, torch.arange(1), 0, layer)
    method.select(call).attend(q, layer.keys, layer.values, 1.0)
    layer.after_attention(torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize("cls,layer_cls,opts", [(SnapKV, SnapKVCacheLayer, dict(window=8, kernel=1)),
                                                 (H2O, H2OCacheLayer, dict(sinks=2, recent=0.25))])
def test_kept_set_follows_the_scores_and_shrinks(cls, layer_cls, opts):
    q, k = _planted()
    method = cls(budget=24, **opts)
    layer = layer_cls(None, method)
    _prefill(method, layer, q, k)
    assert layer.keys.shape == (1, 2, 24, 8)  # (B, Hkv, budget, D): one kept set per KV head (GQA)
    kept = layer.head_pos[0]
    assert (kept == 10).any(-1).all()  # the attended key survives in every KV head
    assert (kept >= 88).sum(-1).min() >= 6  # the recent queries' own window is kept


def test_h2o_evicts_during_decode_by_accumulated_attention():
    q, k = _planted()
    method = H2O(budget=24, sinks=2, recent=0.25)
    layer = H2OCacheLayer(None, method)
    _prefill(method, layer, q, k)
    for step in range(6):
        kn = torch.randn(1, 2, 1, 8) * 0.1
        layer.update(kn, kn)
        qn = torch.zeros(1, 4, 1, 8)
        qn[..., 0] = 1.0  # keeps attending key 10
        call = AttnCall(qn, layer.keys, layer.values, 1.0, 0, torch.arange(1), 0, layer)
        method.select_decode(call).attend(qn, layer.keys, layer.values, 1.0)
        layer.after_attention(layer.kv_start if layer.kv_start is not None else torch.zeros(1, dtype=torch.long))
        assert layer.keys.shape[2] == 24 and layer.dropped(torch.arange(1)) == 96 + step + 1 - 24
    assert (layer.head_pos[0] == 10).any(-1).all()
    assert (layer.head_pos[0] == 96 + 5).any(-1).all()  # the newest token is in the recent window


@pytest.mark.parametrize("name", ["snapkv", "h2o"])
def test_budget_at_or_above_length_is_dense(name):
    model = tiny()
    ids = torch.randint(3, 250, (2, 110))
    with torch.no_grad():
        ref = model(ids).logits
    apply_patch(model, name, budget=200, min_len=0)
    cache = make_cache(model)
    with torch.no_grad():
        steps = [model(ids[:, :100], cache=cache, use_cache=True).logits[:, -1:]]
        for t in range(100, 110):
            steps.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), ref[:, 99:], atol=1e-5, rtol=0)
    assert all(layer.evicted_tokens == 0 for layer in cache.layers)


def test_expected_attention_scores_by_explicit_rotations():
    """The score from pre-RoPE query statistics equals a brute-force version built from explicit RoPE matrices:
    ``mu``, ``S`` of queries rotated back, ``R = mean_p R(p)``, ``softmax(k.R mu s + 1/2 k^T R S R^T k s^2)``
    averaged over the group, times ``|v|``; sinks first."""
    from seqtool.patches.expected_attention import expected_scores

    torch.manual_seed(0)
    b, hkv, g, t, d, future, sinks = 1, 2, 2, 40, 8, 16, 3
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, d, 2).float() / d))

    def rot(p):  # (D, D) RoPE matrix at position p, rotate-half layout
        ang = p * inv_freq.double()
        c, s = ang.cos(), ang.sin()
        m = torch.zeros(d, d, dtype=torch.float64)
        h = d // 2
        m[:h, :h], m[h:, h:] = torch.diag(c), torch.diag(c)
        m[:h, h:], m[h:, :h] = -torch.diag(s), torch.diag(s)
        return m

    q_pre = torch.randn(b, hkv * g, t, d, dtype=torch.float64)
    q = torch.stack([q_pre[:, :, p] @ rot(p).T for p in range(t)], 2)  # RoPE at each query's position
    k, v = torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    call = AttnCall(q.float(), k, v, d ** -0.5, 0, torch.arange(1), 0, None)
    got = expected_scores(call, inv_freq, future, sinks)

    R = torch.stack([rot(p) for p in range(t, t + future)]).mean(0)
    kk = k.double().repeat_interleave(g, 1)
    qs = q_pre[:, :, sinks:]
    mu = qs.mean(2)
    cov = torch.einsum("bhti,bhtj->bhij", qs - mu[:, :, None], qs - mu[:, :, None]) / qs.shape[2]
    mu_f, cov_f = mu @ R.T, R @ cov @ R.T
    s = d ** -0.5
    logits = (kk @ mu_f[..., None]).squeeze(-1) * s + 0.5 * torch.einsum("bhti,bhij,bhtj->bht", kk, cov_f, kk) * s * s
    probs = torch.softmax(logits[..., sinks:], -1).view(b, hkv, g, -1).mean(2) * v[:, :, sinks:].double().norm(dim=-1)
    torch.testing.assert_close(got[..., sinks:].double(), probs, atol=1e-6, rtol=1e-4)
    assert (got[..., :sinks] > got[..., sinks:].amax(-1, keepdim=True)).all()  # sinks are always kept


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_snapkv_pools_only_the_keys_before_the_window(pool):
    """As the official SnapKVCluster: the window's own (large) mass does not spill onto the keys next to it."""
    from seqtool.patches._evict import attention_mass
    from seqtool.patches.snapkv import window_scores

    t, w = 40, 8
    q, k = _planted(t=t, hot=5)
    k[0, :, t - w :, 0] = 30.0  # the window's queries attend the window's keys
    call = AttnCall(q, k, k, 1.0, 0, torch.arange(1), 0, None)
    got = window_scores(call, w, 5, pool)
    mass = attention_mass(q[:, :, -w:], k, 1.0, 2)
    fn = torch.nn.functional.max_pool1d if pool == "max" else torch.nn.functional.avg_pool1d
    want = fn(mass[..., : t - w], 5, stride=1, padding=2)
    torch.testing.assert_close(got[..., : t - w], want)
    torch.testing.assert_close(got[..., t - w :], mass[..., t - w :])
