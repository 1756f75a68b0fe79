"""Context extension: rope_parameters a plain transformers reload reproduces, the default factor, bad input."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from seqtool import recipe as recipe_mod
from seqtool.arch.rope_scaling import apply_context_extension, plan_context_extension, trained_context
from seqtool.errors import BadInputError
from seqtool.zoo.presets import REF_DIR, REF_TRAINED_CONTEXT, build_preset

TRAINED = (128, "test")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3"])
@pytest.mark.parametrize("scale", ["linear:4", "yarn:4", "dynamic:4"])
def test_plain_reload_has_the_same_rope(tmp_path, preset, scale):
    model, _ = build_preset(preset)
    ids = torch.randint(3, 200, (1, 300), generator=torch.Generator().manual_seed(0))  # past the 128-token threshold
    before = _logits(model, ids)
    plan = plan_context_extension(model.config, "512", scale, known_trained_context=TRAINED)
    apply_context_extension(model, plan)
    after = _logits(model, ids)
    assert (after - before).abs().max() > 1e-4  # the RoPE really changed in memory
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.rope_parameters["rope_type"] == scale.split(":")[0]
    assert reloaded.config.rope_parameters["factor"] == 4.0
    torch.testing.assert_close(_logits(reloaded, ids), after, rtol=0, atol=0)
    if scale.startswith("yarn"):
        assert reloaded.config.rope_parameters["original_max_position_embeddings"] == 128
    if scale.startswith("dynamic"):  # transformers' dynamic NTK scales past max_position_embeddings
        assert reloaded.config.max_position_embeddings == 128
    else:
        assert reloaded.config.max_position_embeddings == 512


def test_linear_is_position_interpolation():
    model, _ = build_preset("tiny-llama")
    rotary = model.model.rotary_emb.inv_freq.clone()
    apply_context_extension(model, plan_context_extension(model.config, "8k", "linear:4"))
    assert model.config.max_position_embeddings == 8192
    # linear scaling divides positions by the factor: cos/sin at position 4p equal the old ones at p
    x = torch.zeros(1, 1, 16)
    cos, sin = model.model.rotary_emb(x, torch.tensor([[0, 4, 40, 400]]))
    ang = torch.tensor([0, 1, 10, 100.0])[:, None] * rotary[None]
    torch.testing.assert_close(cos[0, :, :8], ang.cos(), rtol=0, atol=1e-5)
    torch.testing.assert_close(sin[0, :, :8], ang.sin(), rtol=0, atol=1e-5)


def test_default_factor_from_trained_context():
    model, _ = build_preset("tiny-llama")
    # unknown trained context: over max_position_embeddings (4096)
    plan = plan_context_extension(model.config, "8k")
    assert (plan.rope_type, plan.factor) == ("yarn", 2.0) and "max_position_embeddings 4096" in plan.describe()
    assert plan.rope_parameters["original_max_position_embeddings"] == 4096
    # a seqtool recipe step that records the context wins
    recipe_mod.write(model.config, [{"op": "finetune", "context": 2048}])
    plan = plan_context_extension(model.config, "8k", "yarn")
    assert (plan.rope_type, plan.factor) == ("yarn", 4.0) and plan.rope_parameters["original_max_position_embeddings"] == 2048
    assert "trained context 2048" in plan.describe()
    # the shipped ref: known to be trained to 2048 tokens although its config says 8192
    assert trained_context({}, REF_DIR) == (REF_TRAINED_CONTEXT, "ref model (trained to 2048 tokens)")
    assert trained_context({}, "/tmp") == (None, "")
    # no scaling needed when the context does not grow
    assert plan_context_extension(model.config, "1k").rope_parameters is None


@pytest.mark.parametrize("context,scale", [("8q", None), ("-1", None), ("8k", "ntk:4"), ("8k", "linear:x"),
                                           ("8k", "linear:0.5")])
def test_bad_options(context, scale):
    model, _ = build_preset("tiny-llama")
    with pytest.raises(BadInputError):
        plan_context_extension(model.config, context, scale)


def test_refused_models():
    with pytest.raises(BadInputError, match="no rotary"):
        plan_context_extension({"model_type": "gpt2", "max_position_embeddings": 1024}, "8k", "linear:4")
    llama3 = {"model_type": "llama", "max_position_embeddings": 8192,
              "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}}
    with pytest.raises(BadInputError, match="already uses RoPE 'llama3'"):
        plan_context_extension(llama3, "16k", "linear:2")
    phi3, _ = build_preset("tiny-phi3")  # transformers' Phi3Config accepts only default / longrope
    with pytest.raises(BadInputError, match="Phi3Config does not accept"):
        apply_context_extension(phi3, plan_context_extension(phi3.config, "8k", "linear:4"))
    assert phi3.config.rope_parameters["rope_type"] == "default"  # untouched on refusal


def test_a_linearly_scaled_model_stays_linear_without_a_type():
    """The default type is yarn, but a model already scaled linearly is extended linearly (factors multiply)."""
    model, _ = build_preset("tiny-llama")
    apply_context_extension(model, plan_context_extension(model.config, "8k", "linear:2"))
    plan = plan_context_extension(model.config, "16k", known_trained_context=(8192, "test"))
    assert (plan.rope_type, plan.rope_parameters["factor"]) == ("linear", 4.0)
