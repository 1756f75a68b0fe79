"""AMP pruning: exact cases, ratio accounting, GQA validity, scoring that finds dead heads/channels, reload."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import seqtool
from convert_helpers import CALIB, FAMILIES, fresh, logits, plain_transformers_logits
from seqtool.arch.registry import decoder_layers, get_family
from seqtool.convert.layout import attn_mlp_params
from seqtool.convert.prune import config_accepts, parse_targets, plan_prune
from seqtool.errors import BadInputError
from seqtool.zoo.byte_tokenizer import byte_level_tokenizer


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("criterion", ["amp", "magnitude", "random"])
def test_ratio_zero_is_identity(family, criterion, ids):
    loaded = fresh(family)
    before = logits(loaded.model, ids)
    result = seqtool.prune(loaded, 0.0, criterion=criterion, **CALIB)
    assert torch.equal(logits(result.model, ids), before)
    assert result.removed_ratio == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_default_target_lands_within_two_percent(family, ids):
    for ratio in (0.1, 0.2, 0.3, 0.5):
        loaded = fresh(family)
        params = attn_mlp_params(loaded.model)
        result = seqtool.prune(loaded, ratio, criterion="magnitude")
        measured = 1 - attn_mlp_params(result.model) / params
        assert abs(measured - ratio) <= 0.02, (ratio, measured)
        assert measured == pytest.approx(result.removed_ratio, abs=1e-6)
        assert torch.isfinite(logits(result.model, ids)).all()


def test_target_heads_lands_within_one_head():
    for ratio in (0.1, 0.2, 0.3):
        loaded = fresh("tiny-phi3")  # MHA, fused qkv: one head = q, k, v rows + o columns
        params = attn_mlp_params(loaded.model)
        result = seqtool.prune(loaded, ratio, target="heads", criterion="magnitude")
        removed = params - attn_mlp_params(result.model)
        one_head_all_layers = 2 * 4 * 16 * 64
        assert abs(removed - ratio * params) <= one_head_all_layers
        assert result.after.intermediate == result.before.intermediate
    with pytest.raises(BadInputError, match="not reachable within one head with --target heads"):
        seqtool.prune(fresh("tiny-phi3"), 0.45, target="heads", criterion="magnitude")


def test_head_counts_the_config_class_rejects_are_skipped():
    """transformers' LlamaConfig rejects hidden % heads != 0 even with explicit head_dim: a llama keeps 4 or 2 heads
    (never 3), and the MLP absorbs the rest of the budget."""
    result = seqtool.prune(fresh("tiny-llama"), 0.3, criterion="magnitude")
    assert result.after.heads == 2 and abs(result.removed_ratio - 0.3) <= 0.02
    assert not config_accepts(result.model, 3, 3) and config_accepts(fresh("tiny-phi3").model, 3, 3)


def _model_from_config(**overrides):
    config = AutoConfig.for_model("llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=4, head_dim=16, intermediate_size=256, vocab_size=320,
                                  **overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def test_round_to_keeps_intermediate_a_multiple():
    model = _model_from_config()
    result = seqtool.prune(model, 0.3, round_to=64, criterion="magnitude")
    assert result.after.intermediate % 64 == 0 and result.after.intermediate < 256
    assert model.config.intermediate_size == result.after.intermediate
    with pytest.raises(BadInputError, match="--round-to 512 is larger"):
        seqtool.prune(_model_from_config(), 0.3, round_to=512, criterion="magnitude")


def test_gqa_units_keep_a_valid_config():
    query = seqtool.prune(fresh("tiny-mistral"), 0.3, criterion="magnitude")  # 4 query heads, 2 KV heads
    assert (query.after.heads, query.after.kv_heads) == (2, 2)
    removed = query.details["removed_heads"]
    assert all(sorted(h // 2 for h in layer) == [0, 1] for layer in removed)  # one query head from each group
    group = seqtool.prune(fresh("tiny-mistral"), 0.45, criterion="magnitude", gqa_unit="group")
    assert (group.after.heads, group.after.kv_heads) == (2, 1)
    assert all(layer in ([0, 1], [2, 3]) for layer in group.details["removed_heads"])


@pytest.mark.parametrize("family", FAMILIES)
def test_amp_removes_dead_heads_and_channels_exactly(family, ids):
    """Zero the o_proj columns of the heads and the gate rows (silu(0) * up = 0) of the channels the plan will
    remove: AMP must score them lowest, and removing them must leave the logits unchanged."""
    loaded = fresh(family)
    model = loaded.model
    spec = get_family(model)
    plan = plan_prune(model, 0.3, parse_targets("heads,mlp"), None, "query")
    heads, kv, d = model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim
    group = heads // kv
    for i, layer in enumerate(decoder_layers(model)):
        if plan.unit == "head":
            dead = [(i + 1 + j) % heads for j in range(plan.units_removed)]
        else:  # the same query heads of every KV group
            dead = [g * group + (i + g + j) % group for g in range(kv) for j in range(plan.units_removed)]
        o = getattr(getattr(layer, spec.attention), spec.o_proj)
        mlp = getattr(layer, spec.mlp)
        gate = getattr(mlp, spec.gate_up_proj or spec.gate_proj).weight  # phi3: gate rows come first
        channels = torch.randperm(plan.intermediate + plan.channels_removed,
                                  generator=torch.Generator().manual_seed(i))[:plan.channels_removed]
        with torch.no_grad():
            for h in dead:
                o.weight[:, h * d:(h + 1) * d] = 0
            gate[channels] = 0
    before = logits(model, ids)
    result = seqtool.prune(loaded, 0.3, criterion="amp", **CALIB)
    assert result.after.intermediate == plan.intermediate
    torch.testing.assert_close(logits(result.model, ids), before, rtol=1e-5, atol=1e-5)


def test_magnitude_removes_zero_heads_and_random_depends_on_seed():
    loaded = fresh("tiny-llama")
    with torch.no_grad():
        for layer in decoder_layers(loaded.model):
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight[1 * 16:3 * 16] = 0  # heads 1 and 2
            layer.self_attn.o_proj.weight[:, 1 * 16:3 * 16] = 0
    result = seqtool.prune(loaded, 0.3, criterion="magnitude")  # a llama at 0.3 loses 2 of its 4 heads
    assert result.details["removed_heads"] == [[1, 2], [1, 2]]
    runs = [seqtool.prune(fresh("tiny-llama"), 0.3, criterion="random", seed=s).details["removed_heads"]
            for s in (0, 0, 1, 2, 3)]
    assert runs[0] == runs[1]
    assert len({json.dumps(r) for r in runs}) > 1


def test_bad_options_are_clear_errors():
    for kwargs, msg in [({"ratio": 1.0}, r"--ratio must be in \[0, 1\)"), ({"ratio": 0.2, "criterion": "fisher"},
                        "unknown criterion"), ({"ratio": 0.2, "target": "layers"}, "unknown --target"),
                        ({"ratio": 0.2, "bogus": 1}, "does not take option")]:
        ratio = kwargs.pop("ratio")
        with pytest.raises(BadInputError, match=msg):
            seqtool.prune(fresh("tiny-llama"), ratio, **kwargs)


def test_prune_outputs_load_with_plain_transformers(tmp_path, ids):
    """Every family: saved with explicit head_dim, loads without seqtool, same logits; tied embeddings stay tied."""
    dirs, expected = [], []
    for family in FAMILIES:
        result = seqtool.prune(fresh(family), 0.3, criterion="amp", output=tmp_path / family, **CALIB)
        config = json.loads((tmp_path / family / "config.json").read_text())
        assert config["head_dim"] == 16
        assert config["num_attention_heads"] == result.after.heads
        assert config["intermediate_size"] == result.after.intermediate
        assert config["seqtool"]["steps"][-1]["op"] == "prune"
        dirs.append(tmp_path / family)
        expected.append(logits(result.model, ids))
    outs = plain_transformers_logits(dirs, ids, tmp_path)
    for family, want, got in zip(FAMILIES, expected, outs):
        torch.testing.assert_close(got["logits"], want, rtol=1e-5, atol=1e-5)
        assert got["tied"] == (family == "tiny-qwen2")  # qwen2 preset ties embeddings
