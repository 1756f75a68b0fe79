"""`convert --to moe`: identical experts == dense after a plain-transformers reload (every native MoE target),
distinct seeds land in their experts, hidden router, one-line errors that write nothing."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from convert_helpers import logits, plain_transformers_logits
from seqtool.arch.io import load_model, save_model
from seqtool.arch.registry import layer_kinds
from seqtool.cli.app import app
from seqtool.convert import convert

runner = CliRunner()
TARGETS = {"tiny-llama": "MixtralForCausalLM", "tiny-mistral": "MixtralForCausalLM",
           "tiny-qwen2": "Qwen2MoeForCausalLM", "tiny-qwen3": "Qwen3MoeForCausalLM"}


def test_identical_experts_equal_dense_after_plain_reload(tmp_path, ids):
    dirs = []
    for name in TARGETS:
        out = tmp_path / name
        result = convert(name, "moe", output=out, experts=3)
        assert result.details["experts"] == 3 and result.details["top_k"] == 2
        assert result.after.params_total > result.before.params_total
        dirs.append(out)
    plain = plain_transformers_logits(dirs, ids, tmp_path)
    for name, got in zip(TARGETS, plain):
        assert got["class"] == TARGETS[name]
        dense = logits(load_model(name, dtype="fp32").model, ids)
        assert (got["logits"] - dense).abs().max().item() <= 1e-5, name


def _perturbed_copy(name: str, path, seed: int):
    loaded = load_model(name, dtype="fp32")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    save_model(loaded.model, loaded.tokenizer, path)
    return loaded.model


def test_two_seeds_fill_their_experts_and_average_the_rest(tmp_path):
    a = _perturbed_copy("tiny-llama", tmp_path / "a", 1)
    b = _perturbed_copy("tiny-llama", tmp_path / "b", 2)
    text = tmp_path / "a.txt"
    text.write_text("alpha beta gamma delta " * 200)
    result = convert(str(tmp_path / "a"), "moe", from_=str(tmp_path / "b"), router="hidden",
                     router_data=f"{text},{text}", output=tmp_path / "m", samples=4, seq_len=32)
    assert result.details["experts"] == 2 and result.details["top_k"] == 2
    moe = load_model(str(tmp_path / "m"), dtype="fp32").model
    layer = moe.model.layers[1]
    ea, eb = a.model.layers[1].mlp, b.model.layers[1].mlp
    torch.testing.assert_close(layer.mlp.experts.gate_up_proj[0], torch.cat([ea.gate_proj.weight, ea.up_proj.weight]))
    torch.testing.assert_close(layer.mlp.experts.down_proj[1], eb.down_proj.weight)
    mean_q = (a.model.layers[1].self_attn.q_proj.weight + b.model.layers[1].self_attn.q_proj.weight) / 2
    torch.testing.assert_close(layer.self_attn.q_proj.weight, mean_q)
    router = layer.mlp.gate.weight
    assert torch.allclose(router.norm(dim=-1), torch.ones(2), atol=1e-5)  # unit rows: normalised mean hidden states
    assert not torch.allclose(router[0], router[1])  # each seed's hidden states give its own row
    assert [k.ffn for k in layer_kinds(moe.config)] == ["moe", "moe"]


def test_cli_moe_inspect_and_bad_input(tmp_path):
    out = tmp_path / "moe"
    res = runner.invoke(app, ["convert", "tiny-qwen2", "--to", "moe", "--experts", "4", "--top-k", "1",
                              "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["details"]["target"] == "qwen2_moe"
    info = json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).stdout)
    dense = json.loads(runner.invoke(app, ["inspect", "tiny-qwen2", "--json"]).stdout)
    assert info["layer_map"] == ["0-1: attention + moe 4/top-1"]
    assert info["kv_cache_bytes_per_1k_tokens"] == dense["kv_cache_bytes_per_1k_tokens"]
    assert info["params_active"] < info["params_total"] and "prune" not in info["operations"]
    assert "patch" in info["operations"]
    cases = [
        (["tiny-llama", "--to", "moe", "--from", "tiny-qwen2"], "share a family"),
        (["tiny-llama", "--to", "moe", "--experts", "2", "--top-k", "3"], "--top-k 3"),
        (["tiny-llama", "--to", "moe"], "needs --experts"),
        (["tiny-phi3", "--to", "moe", "--experts", "2"], "no native MoE class for 'phi3'"),
        (["tiny-llama", "--to", "bam", "--experts", "1"], "at least 2 experts"),
        (["tiny-llama", "--to", "moe", "--experts", "2", "--router", "nope"], "unknown router"),
        ([str(out), "--to", "moe", "--experts", "2"], "already"),
    ]
    for args, message in cases:
        target = tmp_path / "never"
        res = runner.invoke(app, ["convert", *args, "-o", str(target)])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, (args, res.output)
        assert len([line for line in res.output.splitlines() if line.startswith("error:")]) == 1, res.output
        assert not target.exists() and not list(tmp_path.glob(".seqtool-tmp-*"))
    prune = runner.invoke(app, ["prune", str(out), "--ratio", "0.2", "-o", str(tmp_path / "p")])
    assert prune.exit_code == 2 and "plain attention + dense MLP" in prune.output
    patched = runner.invoke(app, ["patch", str(out), "--method", "streaming", "--budget", "16", "-o",
                                  str(tmp_path / "patched")])  # native MoE: ordinary attention, saves per expert
    assert patched.exit_code == 0, patched.output


def test_seeds_of_different_shapes_are_refused(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {k: v for k, v in load_model("tiny-llama").model.config.to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("llama", **{**values, "intermediate_size": 96})
    other = AutoModelForCausalLM.from_config(config)
    save_model(other, load_model("tiny-llama").tokenizer, tmp_path / "wide")
    res = runner.invoke(app, ["convert", "tiny-llama", "--to", "moe", "--from", str(tmp_path / "wide"),
                              "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "intermediate is 128" in res.output and not (tmp_path / "x").exists()
