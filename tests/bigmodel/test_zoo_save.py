"""`seqtool zoo save`: random presets written tensor by tensor."""
from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from seqtool.arch.io import load_model
from seqtool.arch.stream import SafetensorsSource
from seqtool.cli.app import app
from seqtool.zoo.save import plan_preset, save_preset


def test_saved_preset_loads_and_is_deterministic(tiny_dir, tmp_path):
    files = list(tiny_dir.glob("*.safetensors"))
    assert len(files) > 5  # 30 KB shards (a larger tensor gets a shard of its own)
    model = load_model(str(tiny_dir)).model  # checks every tensor is present with its shape
    assert model.config.num_hidden_layers == 2
    norm = model.model.layers[0].input_layernorm.weight
    assert torch.equal(norm, torch.ones_like(norm))
    w = model.model.layers[0].self_attn.q_proj.weight.detach()
    assert abs(float(w.std()) - 0.02) < 0.003
    again = save_preset("tiny-llama", tmp_path / "again", max_shard_bytes=10**6)
    assert again.shards == 1
    a, b = SafetensorsSource(tiny_dir), SafetensorsSource(tmp_path / "again")
    assert all(torch.equal(a.get(n), b.get(n)) for n in a.names())


def test_tied_preset_leaves_out_lm_head(tiny_qwen2_dir):
    assert "lm_head.weight" not in SafetensorsSource(tiny_qwen2_dir).names()
    assert load_model(str(tiny_qwen2_dir)).model.config.tie_word_embeddings


def test_8b_plan_is_the_public_shape_without_allocating():
    config, plan = plan_preset("llama-3.1-8b")  # meta tensors only: this would be 16 GB
    total = sum(p.info.nbytes for p in plan)
    assert len(plan) == 291 and 8.0e9 < total / 2 < 8.1e9  # 8.03 B parameters in bf16
    assert all(p.info.dtype == torch.bfloat16 for p in plan)
    assert config.num_key_value_heads == 8


def test_cli_zoo_save(tmp_path):
    result = CliRunner().invoke(app, ["zoo", "save", "tiny-qwen3", "-o", str(tmp_path / "q3"), "--dtype", "bf16",
                                      "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dtype"] == "bf16"
    for args, fragment in ((["zoo", "save", "ref", "-o", str(tmp_path / "r")], "unknown preset 'ref'"),
                           (["zoo", "save", "tiny-llama", "-o", str(tmp_path / "q3")], "exists"),
                           (["zoo", "save", "tiny-llama", "-o", str(tmp_path / "x"), "--max-shard-size", "0"],
                            "must be positive")):
        bad = CliRunner().invoke(app, args)
        assert bad.exit_code == 2 and fragment in bad.output, bad.output
