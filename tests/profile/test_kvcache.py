"""Measured KV bytes (real cache tensors) against the analytic formula, for every tiny preset."""
from __future__ import annotations

import pytest
import torch

from seqtool.arch.registry import kv_cache_bytes_per_token
from seqtool.profile.kvcache import analytic_kv_bytes, cache_bytes
from seqtool.profile.measure import Session, default_cache_factory, random_prompt
from seqtool.zoo.presets import TINY_PRESETS, build_preset

# layers, KV heads and head_dim of each tiny preset, written out (not read from the config)
TINY_KV = {"tiny-llama": (2, 4, 16), "tiny-mistral": (2, 2, 16), "tiny-qwen2": (2, 2, 16),
           "tiny-qwen3": (2, 2, 16), "tiny-phi3": (2, 4, 16)}


def test_every_tiny_preset_is_covered():
    assert set(TINY_KV) == set(TINY_PRESETS)


@pytest.mark.parametrize("name", sorted(TINY_PRESETS))
def test_measured_kv_bytes_match_formula(name, tiny_models):
    model = tiny_models[name]
    layers, kv_heads, head_dim = TINY_KV[name]
    batch, tokens, decoded = 2, 37, 3
    session = Session(model, default_cache_factory())
    with torch.inference_mode():
        session.pick(session.prefill(random_prompt(model.config.vocab_size, batch, tokens, torch.device("cpu"))))
        after_prefill = cache_bytes(session.cache)
        for _ in range(decoded):
            session.step()
        after_decode = cache_bytes(session.cache)
    assert after_prefill == layers * 2 * kv_heads * head_dim * tokens * batch * 4
    assert after_decode == layers * 2 * kv_heads * head_dim * (tokens + decoded) * batch * 4
    assert after_prefill == analytic_kv_bytes(model.config, tokens=tokens, batch=batch, bytes_per_element=4)


def test_bf16_cache_counts_two_bytes_per_element():
    model = build_preset("tiny-qwen3", dtype=torch.bfloat16)[0]
    session = Session(model, default_cache_factory())
    with torch.inference_mode():
        session.prefill(random_prompt(model.config.vocab_size, 1, 20, torch.device("cpu")))
    assert cache_bytes(session.cache) == 2 * 2 * 2 * 16 * 20 * 2
    assert kv_cache_bytes_per_token(model.config, 2) * 20 == cache_bytes(session.cache)


def test_evicted_cache_shows_savings(tiny_models):
    """A cache whose layers keep fewer positions (what an evicting patch does) measures smaller."""
    model = tiny_models["tiny-mistral"]
    session = Session(model, default_cache_factory())
    with torch.inference_mode():
        session.prefill(random_prompt(model.config.vocab_size, 1, 40, torch.device("cpu")))
    full = cache_bytes(session.cache)
    for layer in session.cache.layers:
        layer.keys = layer.keys[:, :, -10:].clone()
        layer.values = layer.values[:, :, -10:].clone()
    assert cache_bytes(session.cache) == full // 4


def test_shared_tensors_counted_once():
    t = torch.zeros(4, 8)

    class Layer:
        def __init__(self):
            self.keys, self.values, self.extra = t, t, [t[:2]]

    class Cache:
        layers = [Layer()]

    # keys and values are the same tensor; extra is a different view (2 rows) → 32 + 16 elements
    assert cache_bytes(Cache()) == (32 + 16) * 4
