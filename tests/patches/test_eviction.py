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
