"""BAM: identical seeds in the sequential block == the dense seed (every family, full and K/V-shared attention
experts), cached decoding == a no-cache forward, save + load, inspect's KV bytes, patch refused."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from seqtool.arch.io import load_model
from seqtool.cli.app import app
from seqtool.convert import convert

runner = CliRunner()
IDS = torch.randint(4, 300, (2, 20), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _logits(model, ids=IDS):
    return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-phi3"])
def test_identical_seeds_equal_dense(family):
    seed = load_model(family, dtype="fp32")
    dense = _logits(seed.model)
    for mode in ("full", "kv-shared"):
        result = convert(seed, "bam", experts=3, attention_experts=mode, router="random")
        assert (_logits(result.model) - dense).abs().max().item() <= 1e-5, mode
        factor = 3 if mode == "full" else 1
        assert result.after.kv_cache_bytes_per_token == result.before.kv_cache_bytes_per_token * factor
    torch.testing.assert_close(_logits(seed.model), dense, rtol=0, atol=0)  # the seed itself is untouched


def test_cached_decoding_equals_full_forward():
    a = load_model("tiny-qwen3", dtype="fp32")
    b = load_model("tiny-qwen3", dtype="fp32")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in b.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    for mode in ("full", "kv-shared"):
        model = convert(a, "bam", from_=[b], attention_experts=mode).model
        assert (_logits(model) - _logits(a.model)).abs().max() > 1e-3  # distinct seeds: not the dense model
        prompt = IDS[:, :8]
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
                             pad_token_id=0)
        manual = prompt
        for _ in range(5):  # no cache: full forward each step
            manual = torch.cat([manual, _logits(model, manual)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(out, manual), mode
        with torch.no_grad():
            first = model(input_ids=IDS[:, :12], use_cache=True)
            step = model(input_ids=IDS[:, 12:], cache=first.past_key_values, use_cache=True)
        torch.testing.assert_close(step.logits, _logits(model)[:, 12:], atol=1e-5, rtol=1e-5)


def test_cli_bam_saves_reloads_inspects(tmp_path):
    dense = json.loads(runner.invoke(app, ["inspect", "tiny-llama", "--json"]).stdout)
    for mode, factor in (("full", 2), ("kv-shared", 1)):
        out = tmp_path / mode
        res = runner.invoke(app, ["convert", "tiny-llama", "--to", "bam", "--experts", "2", "--top-k", "1",
                                  "--attention-experts", mode, "--parallel", "-o", str(out), "--json"])
        assert res.exit_code == 0, res.output
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == "seqtool_bam" and config["parallel_block"] is True
        assert "auto_map" not in config  # no remote code
        info = json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).stdout)
        assert info["kv_cache_bytes_per_1k_tokens"] == factor * dense["kv_cache_bytes_per_1k_tokens"]
        assert info["params_active"] < info["params_total"]
        loaded = load_model(str(out), dtype="fp32").model
        assert type(loaded).__name__ == "SeqtoolBamForCausalLM"
        assert loaded.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)
    res = runner.invoke(app, ["patch", str(tmp_path / "full"), "--method", "streaming", "-o", str(tmp_path / "p")])
    assert res.exit_code == 2 and "plain attention" in res.output, res.output
