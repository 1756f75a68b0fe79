"""GQA conversion: exact cases, grouping search, permutation + norm-aware pooling, plain-transformers reload."""
from __future__ import annotations

import json
import math

import pytest
import torch

import seqtool
from convert_helpers import CALIB, FAMILIES, fresh, logits, plain_transformers_logits
from seqtool.arch.registry import decoder_layers, get_family
from seqtool.convert.gqa import _all_partitions, _count_partitions, best_partition, partition_score
from seqtool.convert.layout import read_attention, write_attention
from seqtool.errors import BadInputError


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("grouping", ["mean", "key"])
def test_same_kv_heads_is_identity(family, grouping, ids):
    loaded = fresh(family)
    before = logits(loaded.model, ids)
    kv = loaded.model.config.num_key_value_heads
    result = seqtool.convert(loaded, "gqa", kv_heads=kv, grouping=grouping, **CALIB)
    assert torch.equal(logits(result.model, ids), before)
    assert result.after.kv_heads == kv and result.removed_ratio == 0


def _edit_kv_heads(model, edit):
    """Apply ``edit(AttnWeights, head_dim)`` to every layer's attention weights (in place, through the layout)."""
    spec = get_family(model)
    heads, d = model.config.num_attention_heads, model.config.head_dim
    for layer in decoder_layers(model):
        attn = getattr(layer, spec.attention)
        w = read_attention(attn, spec, heads, d)
        w = type(w)(**{k: (None if v is None else v.clone()) for k, v in vars(w).items()})
        edit(w, d)
        write_attention(attn, spec, w)


def _copy_head(w, dst, src, d, k_mult=1.0, v_mult=1.0):
    w.k[dst * d:(dst + 1) * d] = k_mult * w.k[src * d:(src + 1) * d]
    w.v[dst * d:(dst + 1) * d] = v_mult * w.v[src * d:(src + 1) * d]
    for bias, mult in ((w.k_bias, k_mult), (w.v_bias, v_mult)):
        if bias is not None:
            bias[dst * d:(dst + 1) * d] = mult * bias[src * d:(src + 1) * d]


def test_mean_grouping_is_exact_when_group_members_are_equal(ids):
    loaded = fresh("tiny-llama")  # MHA, 4 KV heads: groups {0,1} and {2,3}
    _edit_kv_heads(loaded.model, lambda w, d: (_copy_head(w, 1, 0, d), _copy_head(w, 3, 2, d)))
    before = logits(loaded.model, ids)
    result = seqtool.convert(loaded, "gqa", kv_heads=2, grouping="mean")
    assert result.model.config.num_key_value_heads == 2
    torch.testing.assert_close(logits(result.model, ids), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,pairs,kv_to", [
    ("tiny-llama", [(2, 0), (3, 1)], 2),   # non-contiguous partners: needs the q/o permutation
    ("tiny-phi3", [(3, 0), (2, 1)], 2),    # fused qkv_proj
    ("tiny-qwen2", [(1, 0)], 1),           # GQA with k/v biases, down to one KV head
])
def test_key_grouping_finds_scaled_copies_and_is_exact(family, pairs, kv_to, ids):
    """KV heads that are scaled copies of others (K x2, V x3) merge without error only if the grouping pairs them,
    the heads are permuted consistently and the norm-aware pooling folds each scale into q rows / o columns."""
    loaded = fresh(family)
    _edit_kv_heads(loaded.model, lambda w, d: [_copy_head(w, dst, src, d, 2.0, 3.0) for dst, src in pairs])
    before = logits(loaded.model, ids)
    mean = seqtool.convert(fresh_copy(loaded), "gqa", kv_heads=kv_to, grouping="mean")
    key = seqtool.convert(loaded, "gqa", kv_heads=kv_to, grouping="key", **CALIB)
    expected = sorted(sorted(p) for p in pairs)
    assert all(groups == expected for groups in key.details["groups"])
    torch.testing.assert_close(logits(key.model, ids), before, rtol=1e-4, atol=1e-4)
    assert (logits(mean.model, ids) - before).abs().max() > 1e-2  # plain contiguous mean pooling is not exact here


def fresh_copy(loaded):
    import copy

    return copy.deepcopy(loaded)


def test_partition_search_exhaustive_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    sim = x @ x.T
    for r in (2, 4):
        everything = list(_all_partitions(list(range(8)), r))
        assert len(everything) == _count_partitions(8, r)
        best = max(partition_score(sim, p) for p in everything)
        assert math.isclose(partition_score(sim, best_partition(sim, r)), best, rel_tol=1e-12)


def test_partition_search_greedy_never_worse_than_contiguous():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    sim = x @ x.T
    assert _count_partitions(16, 4) > 20_000  # the greedy + swap path
    groups = best_partition(sim, 4)
    assert sorted(h for g in groups for h in g) == list(range(16)) and all(len(g) == 4 for g in groups)
    contiguous = [list(range(i, i + 4)) for i in range(0, 16, 4)]
    assert partition_score(sim, groups) >= partition_score(sim, contiguous)


def test_kv_heads_not_dividing_is_a_clear_error():
    with pytest.raises(BadInputError, match="must divide the current 2 KV heads; use one of 1, 2"):
        seqtool.convert(fresh("tiny-mistral"), "gqa", kv_heads=3)
    with pytest.raises(BadInputError, match="unknown grouping"):
        seqtool.convert(fresh("tiny-mistral"), "gqa", kv_heads=1, grouping="median")
    with pytest.raises(BadInputError, match="unknown conversion 'moa'"):
        seqtool.convert(fresh("tiny-mistral"), "moa")


def test_gqa_outputs_load_with_plain_transformers(tmp_path, ids):
    """Every family: the saved checkpoint is the same config class with fewer KV heads and loads without seqtool."""
    dirs, expected = [], []
    for family in FAMILIES:
        loaded = fresh(family)
        result = seqtool.convert(loaded, "gqa", kv_heads=1, grouping="key" if family == "tiny-phi3" else "mean",
                                 output=tmp_path / family, **CALIB)
        config = json.loads((tmp_path / family / "config.json").read_text())
        assert config["num_key_value_heads"] == 1 and config["head_dim"] == 16
        assert config["architectures"] == [type(result.model).__name__]
        assert config["seqtool"]["steps"][-1]["op"] == "convert" and config["seqtool"]["steps"][-1]["to"] == "gqa"
        dirs.append(tmp_path / family)
        expected.append(logits(result.model, ids))
    for want, got in zip(expected, plain_transformers_logits(dirs, ids, tmp_path)):
        torch.testing.assert_close(got["logits"], want, rtol=1e-5, atol=1e-5)


def test_merge_error_formula_matches_direct_computation():
    from seqtool.convert.gqa import merge_errors, pooling_scales

    gen = torch.Generator().manual_seed(2)
    acts = torch.randn(50, 4, 6, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5, 2.0])[:, None]
    gram = torch.einsum("nhd,ngd->hg", acts, acts)
    group = [0, 1, 3]
    for scale in (torch.ones(4, dtype=torch.float64), torch.tensor([1.0, 3.0, 0.5, 2.0], dtype=torch.float64)):
        pooled = (acts[:, group] / scale[group][None, :, None]).mean(1)
        direct = sum(((acts[:, i] - scale[i] * pooled) ** 2).sum() for i in group)
        assert math.isclose(merge_errors(gram, group, scale), float(direct), rel_tol=1e-9)
    chosen = pooling_scales(gram, [group, [2]], 50)
    best = min(merge_errors(gram, group, torch.ones(4, dtype=torch.float64)),
               merge_errors(gram, group, (gram.diagonal() / 50).sqrt()))
    assert math.isclose(merge_errors(gram, group, chosen), best, rel_tol=1e-9)
