"""InfLLM: representative keys, cached unit table == recomputed one, work scales, every preset, plain-cache decode."""
from __future__ import annotations

import torch
from transformers import DynamicCache

from seqtool.patches import apply_patch, make_cache
from seqtool.patches.infllm import representative_keys

from .helpers import tiny
from .test_hip import check_flops_scale, check_no_square, check_presets_masked


def test_representative_keys_brute_force():
    torch.manual_seed(0)
    b, hkv, g, n, u, d, r = 1, 2, 2, 3, 8, 4, 3
    q, k = torch.randn(b, hkv, g, n, u, d), torch.randn(b, hkv, n, u, d)
    got = representative_keys(q, k, k, 0.5, r)
    for h in range(hkv):
        for c in range(n):
            score = torch.tensor([sum(float(q[0, h, gg, c, i] @ k[0, h, c, j]) for gg in range(g) for i in range(j, u))
                                  for j in range(u)])
            top = torch.topk(score, r).indices
            torch.testing.assert_close(got[0, h, c], k[0, h, c, top].mean(0))


def test_cached_unit_table_equals_full_forward_table():
    model = tiny("tiny-qwen2")
    ids = torch.randint(3, 250, (1, 90))
    apply_patch(model, "infllm", budget=0.25, min_len=0, block_size=16)
    cache = make_cache(model)
    with torch.no_grad():
        model(ids[:, :70], cache=cache, use_cache=True)
        for t in range(70, 90):
            model(ids[:, t : t + 1], cache=cache, use_cache=True)
        full = make_cache(model)
        model(ids, cache=full, use_cache=True)
    for layer_c, layer_f in zip(cache.layers, full.layers):
        (key,) = layer_c.state
        torch.testing.assert_close(layer_c.state[key]["reps"], layer_f.state[key]["reps"], atol=1e-5, rtol=1e-5)
        assert layer_c.state[key]["reps"].shape[2] == 90 // 16


def test_decode_with_plain_cache_still_runs_sparse():
    model = tiny("tiny-qwen2")
    handle = apply_patch(model, "infllm", budget=0.25, min_len=0, block_size=16)
    ids = torch.randint(3, 250, (1, 130))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :128], cache=cache, use_cache=True)
        handle.reset_stats()
        out = model(ids[:, 128:], cache=cache, use_cache=True).logits
    assert torch.isfinite(out).all() and handle.kept_fraction() < 0.6


def test_flops_scale_with_budget():
    check_flops_scale("infllm", block_size=16, local_blocks=1)


def test_no_square_tensor_on_sparse_path():
    model = tiny("tiny-qwen2")
    apply_patch(model, "infllm", budget=0.25, min_len=0, block_size=16)
    check_no_square(model, torch.randint(3, 250, (1, 200)))


def test_every_preset_matches_masked_reference():
    check_presets_masked("infllm", block_size=16)
