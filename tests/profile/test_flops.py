"""FLOP formula against hand-computed cases."""
from __future__ import annotations

import math

import pytest

from seqtool.profile.flops import FlopShape, achieved_tflops, attention_flops, flop_shape, prefill_flops

V = 320  # byte-level vocab of the tiny presets


def test_attention_flops_flashattention_count():
    # 4·B·H·T²·D per layer: 4·1·2·16·8 = 1024 per layer, 3 layers; causal halves it
    assert attention_flops(1, 4, 2, 8, 3, causal=False) == 3072
    assert attention_flops(1, 4, 2, 8, 3) == 1536
    assert attention_flops(2, 1000, 32, 128, 1) == 2 * 2 * 32 * 1000 * 1000 * 128


def test_flop_shape_of_tiny_models(tiny_models):
    # tiny-llama: 4 KV heads → q,k,v,o all 64×64; MLP gate/up/down 64×128
    per_layer = 4 * 64 * 64 + 3 * 64 * 128
    assert flop_shape(tiny_models["tiny-llama"]) == FlopShape(2 * per_layer, 64 * V, 2, 4, 16)
    # tiny-mistral: 2 KV heads × 16 → k, v are 64×32
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128
    assert flop_shape(tiny_models["tiny-mistral"]).layer_params == 2 * per_layer
    # tiny-phi3: fused qkv (64 → 3·64) and gate_up (64 → 2·128) hold the same weights as the split layout
    assert flop_shape(tiny_models["tiny-phi3"]).layer_params == flop_shape(tiny_models["tiny-llama"]).layer_params


def test_prefill_flops_hand_case():
    shape = FlopShape(layer_params=1000, lm_head_params=50, layers=2, heads=4, head_dim=8)
    # matmuls 2·1000·(3·10) + lm_head at the last position 2·50·3 + attention 2 layers·2·3·4·10²·8
    expected = 60_000 + 300 + 2 * 2 * 3 * 4 * 100 * 8
    assert prefill_flops(shape, batch=3, seq_len=10) == expected
    assert prefill_flops(shape, batch=3, seq_len=10, logits_positions=10) == expected + 2 * 50 * 3 * 9


def test_achieved_tflops():
    assert achieved_tflops(3_000_000_000_000, 1.5) == pytest.approx(2.0)
    assert math.isnan(achieved_tflops(10, 0.0))
