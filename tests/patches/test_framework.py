"""Framework checks: spec parsing, policy, remove(), eviction, presets, and work measured from outside."""
from __future__ import annotations

import pytest
import torch

from torch.utils.flop_counter import FlopCounterMode

from seqtool.errors import BadInputError
from seqtool.kernels.testing import LargestTensorMode
from seqtool.patches import (ATTN_NAME, Budget, apply_attn_spec, apply_patch, get_handle, make_cache,
                             parse_attn_spec, reapply_from_recipe)
from seqtool.patches.runtime import RUNTIME_ATTR, Policy, seqtool_attention
from seqtool.patches.streaming import StreamingCacheLayer

from .helpers import tiny


def test_parse_attn_spec_and_coercion():
    assert parse_attn_spec("block_topk:budget=0.25,min_len=0") == ("block_topk", {"budget": "0.25", "min_len": "0"})
    assert parse_attn_spec("streaming:dense_layers=0,1,budget=64")[1] == {"dense_layers": "0,1", "budget": "64"}
    assert parse_attn_spec("dense") == ("dense", {})
    model = tiny()
    handle = apply_attn_spec(model, "block_topk:budget=0.1,min_len=0,block=16,dense_layers=1")
    assert handle.runtimes[0].method.budget == 0.1 and handle.runtimes[0].method.block == 16
    assert handle.runtimes[1].method.name == "dense"
    with pytest.raises(BadInputError, match="unknown option"):
        apply_attn_spec(model, "block_topk:bugdet=0.1")
    with pytest.raises(BadInputError, match="unknown attention method"):
        apply_attn_spec(model, "nope")
    with pytest.raises(BadInputError, match="no mass"):
        apply_attn_spec(model, "streaming:mass=0.9")
    with pytest.raises(BadInputError, match="layer 7 out of range"):
        apply_attn_spec(model, "streaming:dense_layers=7")
    handle.remove()


def test_budget_rule():
    assert Budget.parse(0.25).tokens(100) == 25
    assert Budget.parse(30).tokens(100) == 30 and Budget.parse(300).tokens(100) == 100
    assert Budget.parse("full").tokens(77) == 77
    with pytest.raises(BadInputError):
        Budget.parse(-1)


def test_remove_restores_model_exactly():
    model = tiny("tiny-llama")
    ids = torch.randint(3, 250, (1, 100))
    before_impl = model.config._attn_implementation
    with torch.no_grad():
        ref = model(ids).logits
    handle = apply_patch(model, "block_topk", budget=0.1, block=16, min_len=0)
    assert model.config._attn_implementation == ATTN_NAME
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, ref)
    handle.remove()
    assert model.config._attn_implementation == before_impl and get_handle(model) is None
    assert not any(hasattr(m, RUNTIME_ATTR) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_eviction_really_shrinks_the_cache():
    model = tiny()
    apply_patch(model, "streaming", budget=48, block=16, sink_blocks=1)
    ids = torch.randint(3, 250, (2, 200))
    cache = make_cache(model)
    with torch.no_grad():
        model(ids[:, :180], cache=cache, use_cache=True)
        assert isinstance(cache.layers[0], StreamingCacheLayer)
        kept = [layer.keys.shape[2] for layer in cache.layers]
        assert max(kept) <= 16 + 48 and cache.get_seq_length() == 180
        for t in range(180, 200):
            model(ids[:, t : t + 1], cache=cache, use_cache=True)
            assert max(layer.keys.shape[2] for layer in cache.layers) <= 16 + 48
    assert cache.get_seq_length() == 200


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-phi3"])
def test_every_tiny_preset(preset):
    model = tiny(preset)
    ids = torch.randint(3, 250, (1, 130))
    with torch.no_grad():
        ref = model(ids).logits
    handle = apply_patch(model, "block_topk", budget="full", block=16, min_len=0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=0)
    handle.remove()
    handle = apply_patch(model, "block_topk", budget=0.25, block=16, min_len=0)
    with torch.no_grad():
        out = model(ids).logits
    assert torch.isfinite(out).all() and handle.kept_fraction() < 0.75
    handle.remove()


def test_min_len_runs_dense_and_policy_dense_layers():
    model = tiny()
    ids = torch.randint(3, 250, (1, 100))
    with torch.no_grad():
        ref = model(ids).logits
    handle = apply_patch(model, "block_topk", budget=0.1, block=16, min_len=101)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=0)
    assert all(rt.dense_calls == 1 and rt.sparse_calls == 0 for rt in handle.runtimes.values())
    handle = apply_patch(model, "block_topk", budget=0.1, block=16, min_len=0, dense_layers=[0])
    with torch.no_grad():
        model(ids)
    stats = {s.layer: s for s in handle.stats()}
    assert stats[0].method == "dense" and stats[0].kept_fraction == 1.0 and stats[1].kept_fraction < 0.5
    handle.remove()


def test_recipe_roundtrip():
    model = tiny()
    handle = apply_patch(model, "streaming", budget=64, block=16, dense_layers=[1])
    step = handle.recipe_step()
    handle.remove()
    again = reapply_from_recipe(model, [{"op": "convert"}, step])
    assert again.method == "streaming" and again.runtimes[1].method.name == "dense"
    assert again.runtimes[0].method.budget == 64 and again.spec == handle.spec
    again.remove()


def test_layer_options_survive_save_and_reload(tmp_path):
    import seqtool
    from seqtool.patches.checkpoint import patch_checkpoint

    model = tiny("tiny-llama")
    handle = apply_patch(model, "block_topk", policy=Policy(layer_options={1: {"budget": 0.5, "block": 8}}),
                         budget=0.25, block=16)
    step = handle.recipe_step()
    handle.remove()
    assert "layer1.budget=0.5" in step["spec"]
    again = reapply_from_recipe(model, [step])
    assert again.policy.layer_options == {1: {"budget": 0.5, "block": 8}}
    assert again.runtimes[1].method.budget == 0.5 and again.runtimes[1].method.block == 8
    assert again.runtimes[0].method.budget == 0.25 and again.runtimes[0].method.block == 16
    again.remove()
    # the same through the CLI's path: --set layer1.budget=0.5, saved, loaded with seqtool.load
    out = tmp_path / "p"
    patch_checkpoint("tiny-llama", "block_topk", budget="0.25", set_options=["layer1.budget=0.5"], output=str(out))
    loaded = get_handle(seqtool.load(str(out)).model)
    assert loaded.runtimes[1].method.budget == 0.5 and loaded.runtimes[0].method.budget == 0.25
    with pytest.raises(BadInputError, match="layer 7 out of range"):
        apply_patch(model, "block_topk", **{"layer7.budget": 0.5})
    with pytest.raises(BadInputError, match="runs dense"):
        apply_patch(model, "block_topk", dense_layers=[1], **{"layer1.budget": 0.5})


def test_mask_with_holes_is_rejected():
    model = tiny()
    apply_patch(model, "block_topk", budget=0.5)
    mask = torch.ones(1, 40, dtype=torch.long)
    mask[0, 10] = 0
    with pytest.raises(BadInputError, match="holes"), torch.no_grad():
        model(torch.randint(3, 250, (1, 40)), attention_mask=mask)




def _attention_work(method: str, budget, t: int = 1024, tq: int | None = None, **opts):
    """(flops, largest tensor, kept fraction) of one patched attention call on random q/k/v (1, 4, T, 32)."""
    model = tiny()
    handle = apply_patch(model, method, budget=budget, min_len=0, **opts)
    module = model.model.layers[0].self_attn
    tq = tq or t
    q = torch.randn(1, 4, tq, 32)
    k, v = torch.randn(1, 2, t, 32), torch.randn(1, 2, t, 32)
    flops, big = FlopCounterMode(display=False), LargestTensorMode()
    with torch.no_grad(), flops, big:
        seqtool_attention(module, q, k, v, None, scaling=32 ** -0.5)
    kept = handle.kept_fraction()
    handle.remove()
    return flops.get_total_flops(), big.largest, kept


@pytest.mark.parametrize("method,opts", [("block_topk", dict(block=64)), ("vertical_slash", dict(block=64)),
                                         ("streaming", dict(block=64))])
def test_prefill_flops_scale_with_budget(method, opts):
    full, _, _ = _attention_work(method, "full", **opts)
    work = {b: _attention_work(method, b, **opts) for b in (0.1, 0.4)}
    for budget, (flops, largest, kept) in work.items():
        # attention FLOPs follow the measured kept fraction (whole diagonal blocks + selection overhead)
        assert flops < full * (1.3 * kept + 0.15), (budget, flops / full, kept)
    flops, largest, kept = work[0.1]
    assert flops < 0.3 * full and kept < 0.25
    assert largest < 1024 * 1024 // 2, f"a {largest}-element tensor (~Tq x Tk) was allocated at budget 0.1"
    assert work[0.1][0] < work[0.4][0] < full


def test_quest_decode_flops_scale_with_budget():
    full, _, _ = _attention_work("block_topk", "full", t=4096, tq=1, page=32)
    sparse, largest, kept = _attention_work("block_topk", 0.1, t=4096, tq=1, page=32)
    assert kept < 0.15 and sparse < full * 0.3


def test_streaming_chunks_after_eviction_equal_a_full_forward():
    """Several queries per call after eviction (chunked prefill / speculative decode), padded batch included."""
    model = tiny()
    apply_patch(model, "streaming", budget=48, block=16, sink_blocks=1)
    ids = torch.randint(3, 250, (2, 230))
    with torch.no_grad():
        ref = model(ids).logits  # one call: every query sees its sink + window blocks, nothing evicted
        cache = make_cache(model)
        outs = [model(ids[:, :100], cache=cache, use_cache=True).logits]
        t = 100
        for n in (5, 37, 1, 16, 64, 7):  # chunks starting inside and on block boundaries
            outs.append(model(ids[:, t : t + n], cache=cache, use_cache=True).logits)
            t += n
            assert max(layer.keys.shape[2] for layer in cache.layers) <= 16 + 48 + n
        assert cache.layers[0].evicted_tokens > 0
    torch.testing.assert_close(torch.cat(outs, 1), ref[:, :t], atol=1e-4, rtol=1e-4)


def test_vertical_slash_block_default_follows_length():
    from seqtool.patches.runtime import build_method

    default = build_method("vertical_slash", {})
    assert default.block_for(2048) == 64 and default.block_for(16384) == 128
    fixed = build_method("vertical_slash", {"block": "32"})
    assert fixed.block == 32 and fixed.block_for(16384) == 32
