"""apply_patch runs a method's offline ``prepare(model)`` (razor / act head search) and the recipe stores the result,
so `seqtool patch --method razor|act` works without explicit heads and `seqtool.load` re-applies the same heads."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import seqtool
from seqtool.cli.app import app
from seqtool.patches import act, razor
from seqtool.patches.runtime import apply_patch, get_handle

SEARCH = {"razor": (razor, "find_retrieval_heads"), "act": (act, "find_calibration_heads")}


def _expected_heads(method: str) -> list[str]:
    model = seqtool.load("tiny-llama").model
    if method == "razor":
        return list(razor.find_retrieval_heads(model, razor.RazorMethod.retrieval_share))
    return list(act.find_calibration_heads(model))


@pytest.mark.parametrize("method", ["razor", "act"])
def test_patch_cli_finds_heads_and_load_reuses_them(tmp_path, monkeypatch, method):
    out = tmp_path / method
    result = CliRunner().invoke(app, ["patch", "tiny-llama", "--method", method, "--set", "min_len=0",
                                      "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    heads = json.loads(result.stdout)["options"]["heads"]
    assert heads == _expected_heads(method)  # the heads the offline search finds on the unpatched model
    if method == "razor":
        assert heads  # retrieval_share 0.15 of 8 KV heads -> 1 head
    steps = json.loads((out / "config.json").read_text())["seqtool"]["steps"]
    assert steps[-1]["options"]["heads"] == heads

    module, name = SEARCH[method]

    def no_search(*args, **kwargs):
        raise AssertionError("seqtool.load searched the heads again instead of using the recipe")

    monkeypatch.setattr(module, name, no_search)
    loaded = seqtool.load(str(out))
    handle = get_handle(loaded.model)
    assert handle is not None and handle.method == method
    assert all(list(rt.method.heads) == heads for rt in handle.runtimes.values())
    ids = torch.randint(3, 250, (1, 40))
    with torch.no_grad():
        logits = loaded.model(ids).logits
    assert torch.isfinite(logits).all() and handle.kept_fraction() is not None


def test_apply_patch_prepares_on_the_unpatched_model():
    model = seqtool.load("tiny-llama").model
    first = apply_patch(model, "block_topk", budget=0.25, min_len=0, block=16)
    handle = apply_patch(model, "act")  # the previous patch is removed before act's head search (which needs that)
    assert not first.active and handle.options["heads"] == _expected_heads("act")
    given = apply_patch(model, "razor", heads=["1.0"])
    assert given.options["heads"] == ["1.0"]  # explicit heads: no search
    given.remove()


def test_per_layer_methods_reuse_the_base_search(monkeypatch):
    from seqtool.patches.runtime import Policy

    model = seqtool.load("tiny-llama").model
    calls = []
    real = razor.find_retrieval_heads

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(razor, "find_retrieval_heads", counted)
    handle = apply_patch(model, "razor", policy=Policy(layer_options={1: {"budget": 0.5}}), budget=0.25)
    try:
        assert len(calls) == 1  # the layer-1 method starts from the base's found heads
        base, layer1 = handle.runtimes[0].method, handle.runtimes[1].method
        assert layer1 is not base and layer1.budget == 0.5 and layer1.heads == base.heads
        assert list(base.heads) == handle.options["heads"]
    finally:
        handle.remove()
