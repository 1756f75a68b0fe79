"""Streamed weight-only rewrites (convert --to gqa, prune): bit-identical to the in-memory path."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from seqtool.arch.offload import make_offload, offloading
from seqtool.arch.stream import SafetensorsSource
from seqtool.cli.app import app
from seqtool.convert import convert
from seqtool.convert.pipeline import prune_model
from seqtool.errors import BadInputError

CALIB = dict(samples=2, seq_len=32)


def assert_identical(a_dir, b_dir):
    a, b = SafetensorsSource(a_dir), SafetensorsSource(b_dir)
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        x, y = a.get(name), b.get(name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a_dir, b_dir))
    for key in ("num_key_value_heads", "num_attention_heads", "head_dim", "intermediate_size", "architectures",
                "dtype"):
        assert ca.get(key) == cb.get(key), key
    assert [s["op"] for s in ca["seqtool"]["steps"]] == [s["op"] for s in cb["seqtool"]["steps"]]


@pytest.mark.parametrize("preset,run", [
    ("tiny_dir", lambda src, out, **kw: convert(src, "gqa", kv_heads=2, output=out, **kw)),
    ("tiny_qwen2_dir", lambda src, out, **kw: convert(src, "gqa", kv_heads=1, output=out, **kw)),
    ("tiny_dir", lambda src, out, **kw: prune_model(src, 0.3, criterion="magnitude", output=out, **kw)),
    ("tiny_qwen2_dir", lambda src, out, **kw: prune_model(src, 0.3, criterion="random", seed=1, output=out, **kw)),
], ids=["gqa-mean", "gqa-qwen2-tied-bias", "prune-magnitude", "prune-random"])
def test_streamed_equals_in_memory(preset, run, request, tmp_path):
    src = request.getfixturevalue(preset)
    run(str(src), tmp_path / "mem", stream=False, max_shard_size="40KB")
    result = run(str(src), tmp_path / "str", stream=True, max_shard_size="40KB")
    assert result.details["streamed"] and result.model is None
    assert len(list((tmp_path / "str").glob("*.safetensors"))) > 3  # sharded output
    assert_identical(tmp_path / "mem", tmp_path / "str")


@pytest.mark.parametrize("run", [
    lambda src, out, **kw: convert(src, "gqa", kv_heads=2, grouping="key", output=out, **CALIB, **kw),
    lambda src, out, **kw: prune_model(src, 0.3, criterion="amp", output=out, **CALIB, **kw),
], ids=["gqa-key", "prune-amp"])
def test_streamed_calibrated_offloaded_equals_in_memory(tiny_dir, run, tmp_path):
    mem = run(str(tiny_dir), tmp_path / "mem", stream=False)
    with offloading(make_offload("auto", "cpu=60KB")):  # calibration forward on the disk-offloaded model
        streamed = run(str(tiny_dir), tmp_path / "str", stream=None)  # offload requested: streams by itself
    assert streamed.details["streamed"]
    key = "groups" if "groups" in mem.details else "removed_heads"
    assert mem.details[key] == streamed.details[key]
    assert_identical(tmp_path / "mem", tmp_path / "str")


def test_auto_mode_streams_only_what_does_not_fit(tiny_dir, tmp_path, monkeypatch):
    from seqtool.convert import streamed

    result = convert(str(tiny_dir), "gqa", kv_heads=2, output=tmp_path / "a", stream=None)
    assert "streamed" not in result.details and result.model is not None
    monkeypatch.setattr(streamed, "AUTO_FRACTION", 1e-9)  # as if the machine had no memory to spare
    result = convert(str(tiny_dir), "gqa", kv_heads=2, output=tmp_path / "b", stream=None)
    assert result.details["streamed"]


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(model="tiny-llama"), "checkpoint directory"),
    (dict(recover="lora"), "no --recover"),
    (dict(output=None), "new output directory"),
    (dict(to="hybrid"), "weight-only rewrite"),
])
def test_stream_refusals(tiny_dir, tmp_path, kwargs, fragment):
    args = dict(model=str(tiny_dir), to="gqa", output=tmp_path / "o")
    args.update(kwargs)
    options = {"kv_heads": 2} if args["to"] == "gqa" else {}
    with pytest.raises(BadInputError, match=fragment):
        convert(args.pop("model"), args.pop("to"), stream=True, **args, **options)


def test_cli_stream(tiny_dir, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["convert", str(tiny_dir), "--to", "gqa", "--kv-heads", "2", "--stream",
                                      "--max-shard-size", "50KB", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["details"]["streamed"] and data["after"]["kv_heads"] == 2
    from seqtool.arch.io import load_model

    assert load_model(str(out)).model.config.num_key_value_heads == 2
    bad = CliRunner().invoke(app, ["prune", str(tiny_dir), "--ratio", "0.2", "--stream", "--max-shard-size", "2XB",
                                   "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "malformed --max-shard-size" in bad.output
