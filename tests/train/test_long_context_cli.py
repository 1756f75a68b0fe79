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
