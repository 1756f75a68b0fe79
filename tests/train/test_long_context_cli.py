"""`seqtool finetune --method sinklora|s2attn --context ...`: a tiny end-to-end run and one-line bad-input errors."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from seqtool.cli.app import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, ["--quiet", *args])


def test_sinklora_finetune_saves_an_extended_full_attention_model(tmp_path):
    out = tmp_path / "out"
    result = run("finetune", "tiny-llama", "--method", "sinklora", "--context", "256", "--rope-scale", "linear:2",
                 "--group-size", "64", "--steps", "2", "--mix-retrieval", "0", "--threads", "1", "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["method"] == "sinklora" and data["train"] == ["attention", "embed", "norm"]
    assert data["long_context"] == {"context": 256, "rope_scale": "linear:2", "rope_factor_source": "given",
                                    "attention": "sinklora", "group_size": 64, "sinks": 4}
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 2.0
    assert config["max_position_embeddings"] == 256
    step = config["seqtool"]["steps"][-1]
    assert (step["op"], step["context"], step["attention"], step["seq_len"]) == ("finetune", 256, "sinklora", 256)
    # plain transformers loads it with full attention (nothing of seqtool registered) and generates
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(3, 200, (1, 20))
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 23)


@pytest.mark.parametrize("args, fragment", [
    (["--method", "sinklora", "--steps", "1"], "needs --context"),
    (["--method", "s2attn", "--context", "8q"], "malformed length"),
    (["--method", "s2attn", "--context", "256", "--group-size", "100"], "does not divide the context 256"),
    (["--method", "s2attn", "--context", "256", "--sinks", "2"], "--sinks needs --method sinklora"),
    (["--method", "lora", "--context", "256", "--rope-scale", "ntk:4"], "unknown RoPE scaling 'ntk'"),
    (["--context", "256", "--seq-len", "128", "--steps", "1"], "differs from --context"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, fragment):
    result = run("finetune", "tiny-llama", *args, "-o", str(tmp_path / "o"))
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_rope_scale_refused_where_transformers_cannot_load_it(tmp_path):
    result = run("finetune", "tiny-phi3", "--method", "sinklora", "--context", "256", "--rope-scale", "linear:2",
                 "--steps", "1", "-o", str(tmp_path / "o"))
    assert result.exit_code == 2 and "Phi3Config does not accept RoPE 'linear'" in result.output


def test_recipe_schedule_and_self_teacher(tmp_path):
    """--context with a kl loss and no --teacher: the model before the extension teaches on its trained context
    (here 256 / linear:2 = 128 tokens); --short-frac puts the first steps on rows of that length."""
    out = tmp_path / "out"
    result = run("finetune", "tiny-llama", "--method", "sinklora", "--context", "256", "--rope-scale", "linear:2",
                 "--steps", "4", "--short-frac", "0.5", "--loss", "lm=1,kl=1", "--mix-retrieval", "0",
                 "--threads", "1", "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["teacher"] == "tiny-llama (before the extension)"
    assert data["data"]["schedule"] == [{"until_step": 2, "seq_len": 128, "batch": 4},
                                        {"until_step": 4, "seq_len": 256, "batch": 1}]
    assert data["loss_final"]["loss_kl"] > 0  # the scaled RoPE differs from the teacher's


@pytest.mark.parametrize("frac, want", [(0.0, [(10, 8192, 1)]), (0.7, [(7, 2048, 2), (3, 8192, 1)]),
                                        (0.5, [(5, 2048, 2), (5, 8192, 1)])])
def test_phases(frac, want):
    from seqtool.arch.rope_scaling import plan_context_extension
    from seqtool.train.long_context import LongContextSetup

    plan = plan_context_extension({"model_type": "llama", "max_position_embeddings": 2048, "rope_theta": 1e4,
                                   "head_dim": 16}, "8k", "linear:4", known_trained_context=(2048, "test"))
    setup = LongContextSetup(plan, "sinklora", 2048, 4)
    assert setup.teacher_context() == 2048
    assert setup.phases(10, 1, frac, 2) == want
    assert setup.phases(10, 1, 0.99, 4) == [(9, 2048, 4), (1, 8192, 1)]  # at least one step at the new context
    assert setup.phases(1, 1, 0.9, 4) == [(1, 8192, 1)]
    assert setup.phases(10, 1, 0.5, 4, short_len=512) == [(5, 512, 4), (5, 8192, 1)]
    assert setup.phases(10, 1, 0.5, 4, short_len=4096) == [(5, 2048, 4), (5, 8192, 1)]  # capped: the teacher's
    with pytest.raises(Exception, match="short_frac"):
        setup.phases(10, 1, 1.0, 2)


def test_rope_scale_on_a_model_without_rope_is_one_line_exit_2(tmp_path):
    """GraniteMoeHybrid with position_embedding_type None ("nope") keeps rope_parameters in its config but uses no
    rotary embeddings: --rope-scale is refused; without it the context grows with RoPE unchanged."""
    from transformers import AutoTokenizer, GraniteMoeHybridConfig

    from seqtool.zoo import presets

    config = GraniteMoeHybridConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=0,
                                    shared_intermediate_size=128, layer_types=["attention", "attention"])
    assert config.position_embedding_type is None and config.rope_parameters  # the trap: parameters, no RoPE
    src = tmp_path / "nope"
    AutoModelForCausalLM.from_config(config).save_pretrained(src)
    AutoTokenizer.from_pretrained(presets.REF_DIR).save_pretrained(src)
    result = run("finetune", str(src), "--method", "sinklora", "--context", "256", "--rope-scale", "linear:2",
                 "--steps", "1", "-o", str(tmp_path / "o"))
    assert result.exit_code == 2 and "has no rotary embeddings" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()
