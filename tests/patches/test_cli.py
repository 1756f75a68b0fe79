"""End to end: `seqtool patch` on a tiny model saves, reloads with the patch re-applied, and generates."""
from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from seqtool.cli.app import app
from seqtool.patches import get_handle, make_cache


def test_patch_cli_saves_reloads_and_generates(tmp_path):
    out = tmp_path / "patched"
    result = CliRunner().invoke(app, ["patch", "tiny-llama", "--method", "streaming", "--budget", "48",
                                      "--set", "block=16", "--set", "min_len=0", "--dense-layers", "1",
                                      "--report", "--probe-tokens", "96", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["output"] == str(out) and data["options"]["budget"] == 48
    heads = data["report"]["heads"]
    assert {h["layer"] for h in heads} == {0, 1}
    assert all(h["keys_computed"] < 0.9 for h in heads if h["layer"] == 0)
    assert all(h["keys_computed"] == 1.0 and h["method"] == "dense" for h in heads if h["layer"] == 1)
    steps = json.loads((out / "config.json").read_text())["seqtool"]["steps"]
    assert steps[-1]["op"] == "patch" and steps[-1]["runtime"] is True

    import seqtool

    loaded = seqtool.load(str(out))
    handle = get_handle(loaded.model)
    assert handle is not None and handle.method == "streaming" and handle.runtimes[1].method.name == "dense"
    ids = torch.randint(3, 250, (1, 80))
    with torch.no_grad():
        gen = loaded.model.generate(ids, cache=make_cache(loaded.model), max_new_tokens=8, do_sample=False)
    assert gen.shape == (1, 88)


def test_patch_cli_bad_option_is_one_line_error(tmp_path):
    result = CliRunner().invoke(app, ["patch", "tiny-llama", "--method", "block_topk", "--set", "nope=1",
                                      "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "unknown option 'nope'" in result.output
