"""finetune end to end: in-domain held-out perplexity falls on a second family (qwen2, GQA), the output loads with
plain transformers and carries the recipe step; the CLI's --json, --help and one-line errors."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import seqtool
from seqtool.cli.app import app


def test_finetune_lowers_in_domain_perplexity_and_saves_a_plain_checkpoint(tmp_path, domain_file):
    out, adapter = tmp_path / "tuned", tmp_path / "adapter"
    result = seqtool.finetune("tiny-qwen2", data=str(domain_file), steps=12, seq_len=32, batch=4, lr=5e-3,
                              output=out, save_adapter=adapter, progress="off", run_dir=tmp_path / "run")
    assert result.heldout_ppl < 0.8 * result.heldout_ppl_before  # in-domain held-out rows
    assert result.loss_final["loss_lm"] < result.loss_first["loss_lm"]
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert plain.config.num_key_value_heads < plain.config.num_attention_heads  # the GQA family
    ids = torch.randint(4, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, result.model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    step = json.loads((out / "config.json").read_text())["seqtool"]["steps"][-1]
    assert step["op"] == "finetune" and step["steps"] == 12 and step["train"] == ["attention", "mlp"]
    assert step["data"]["fingerprint"] == result.data["fingerprint"] and "loss_lm" in step["final_losses"]
    assert (adapter / "adapter_config.json").exists() and (tmp_path / "run" / "log.jsonl").exists()


runner = CliRunner()


def test_cli_json_and_help(tmp_path, domain_file):
    res = runner.invoke(app, ["finetune", "tiny-llama", "--data", str(domain_file), "--steps", "2", "--seq-len",
                              "32", "--batch", "2", "--method", "full", "--train", "norm", "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["method"] == "full" and payload["train"] == ["norm"] and payload["output"] is None
    assert "Examples" in runner.invoke(app, ["finetune", "--help"]).stdout


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/x.txt"], "does not exist"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--teacher", "ref", "--loss", "kl"], "tokenizer differs"),
    (["--loss", "kl"], "needs a teacher"),
    (["--train", "attention,router"], "unknown module kind router"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, domain_file, args, message):
    base = ["finetune", "tiny-llama", "--data", str(domain_file), "--steps", "2", "--seq-len", "32", "--batch", "2",
            "-o", str(tmp_path / "out")]
    if "--steps" in args:
        base = base[:4] + base[6:]
    res = runner.invoke(app, base + args)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert not (tmp_path / "out").exists()
