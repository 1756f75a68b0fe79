"""CLI: `seqtool convert` / `seqtool prune` save, reload and generate; errors are one line with exit code 2."""
from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from seqtool.arch.io import load_model
from seqtool.cli.app import app

runner = CliRunner()


def test_prune_cli_saves_reloads_and_generates(tmp_path):
    out = tmp_path / "p"
    res = runner.invoke(app, ["prune", "tiny-mistral", "--ratio", "0.3", "--samples", "4", "--seq-len", "32",
                              "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["op"] == "prune" and data["output"] == str(out) and abs(data["removed_ratio"] - 0.3) <= 0.02
    model = load_model(str(out), device="cpu").model
    assert model.config.num_attention_heads == data["after"]["heads"] == 2
    gen = model.generate(torch.tensor([[1, 50, 60, 70]]), max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 9)
    table = runner.invoke(app, ["prune", "tiny-mistral", "--ratio", "0.2", "--criterion", "magnitude",
                                "-o", str(out), "--force"])
    assert table.exit_code == 0 and "attention + MLP params" in table.stdout


def test_convert_cli_gqa_and_errors(tmp_path):
    out = tmp_path / "g"
    res = runner.invoke(app, ["convert", "tiny-llama", "--to", "gqa", "--kv-heads", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "2 / 2" not in res.stdout and "4 / 2" in res.stdout  # heads / KV heads after
    assert load_model(str(out), device="cpu").model.config.num_key_value_heads == 2
    cases = [
        (["convert", "tiny-mistral", "--to", "gqa", "--kv-heads", "3", "-o", str(tmp_path / "x")], "must divide"),
        (["convert", "tiny-llama", "--to", "gqa", "--kv-heads", "2", "-o", str(out)], "exists; pass --force"),
        (["convert", "tiny-llama", "--to", "gqa", "-o", str(tmp_path / "y")], "needs --kv-heads"),
        (["prune", "tiny-llama", "--ratio", "1.5", "-o", str(tmp_path / "z")], "--ratio must be in"),
        (["prune", "tiny-llama", "--ratio", "0.2"], "pass -o OUT"),
    ]
    for args, msg in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and msg in lines[0], res.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()
