"""--device-map auto --max-memory: accelerate offload gives the fully loaded model's results."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from seqtool.arch import offload
from seqtool.arch.io import load_model
from seqtool.cli.app import app
from seqtool.errors import BadInputError

# tiny-llama is ~480 KB in fp32: with 60 KB of CPU memory every layer is offloaded to disk
SMALL = "cpu=60KB"


@pytest.mark.parametrize("text,expected", [("8MB", 8_000_000), ("2GiB", 2 * 2**30), ("512", 512), ("1.5kb", 1500),
                                           ("3 MiB", 3 * 2**20), ("7G", 7 * 10**9)])
def test_parse_size(text, expected):
    assert offload.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "8XB", "MB", "-1MB", "0", "1e3"])
def test_parse_size_rejects(text):
    with pytest.raises(BadInputError):
        offload.parse_size(text)


def test_parse_max_memory():
    assert offload.parse_max_memory("cpu=8MB,cuda:1=2GiB, 0=1GB") == {"cpu": 8_000_000, 1: 2 * 2**30, 0: 10**9}
    for bad in ("cpu", "gpu=8MB", "cpu=8MB,cpu=9MB", "disk=1GB", "cpu=", "cpu=x"):
        with pytest.raises(BadInputError):
            offload.parse_max_memory(bad)


def test_offloaded_logits_equal_full(tiny_dir):
    full = load_model(str(tiny_dir)).model
    with offload.offloading(offload.make_offload("auto", SMALL)) as setting:
        off = load_model(str(tiny_dir)).model
        assert offload.is_offloaded(off) and "disk" in offload.placement_summary(off)
        assert not offload.is_offloaded(full)
        folders = list(setting._dirs)
        ids = torch.arange(3, 40)[None]
        with torch.no_grad():
            assert torch.allclose(full(ids).logits, off(ids).logits, atol=1e-5)
    assert folders and not any(__import__("os").path.exists(f) for f in folders)  # temp offload dirs removed


def _ppl(args):
    import json

    result = CliRunner().invoke(app, ["eval", *args, "--task", "ppl", "--seq-len", "128", "--ppl-tokens", "384",
                                      "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{"):])["ppl"][0]["ppl"]


def test_eval_ppl_offloaded_equals_full(tiny_dir):
    """With an attention patch (seqtool's attention replacement under accelerate's offload hooks)."""
    extra = ["--attn", "block_topk:budget=0.25,min_len=0"]
    full = _ppl([str(tiny_dir), *extra])
    off = _ppl([str(tiny_dir), *extra, "--device-map", "auto", "--max-memory", SMALL])
    assert abs(off - full) <= 1e-3 * full


def test_patch_offloaded_writes_the_same_checkpoint(tiny_dir, tmp_path):
    """The patch (and its --report probe, run on the disk-offloaded model) works offloaded; the written checkpoint
    equals the fully loaded run's."""
    import json

    from seqtool.arch.stream import SafetensorsSource

    outs = []
    for name, extra in (("full", []), ("off", ["--report", "--probe-tokens", "128", "--max-memory", SMALL])):
        out = tmp_path / name
        result = CliRunner().invoke(app, ["patch", str(tiny_dir), "--method", "block_topk", "--budget", "0.25",
                                          "--set", "min_len=0", "-o", str(out), *extra, "--json"])
        assert result.exit_code == 0, result.output
        outs.append(json.loads(result.stdout[result.stdout.index("{"):]))
    a, b = SafetensorsSource(tmp_path / "full"), SafetensorsSource(tmp_path / "off")
    assert sorted(a.names()) == sorted(b.names())
    assert all(torch.equal(a.get(n), b.get(n)) for n in a.names())
    report = outs[1]["report"]
    assert 0 < report["recall_answer"] < 1 and 0 < report["keys_computed"] < 1  # the sparse patch ran


def test_prune_calibration_hooks_see_offloaded_weights(tiny_dir):
    from seqtool.convert.calib import calibration_ids
    from seqtool.convert.prune import amp_scores

    full = load_model(str(tiny_dir))
    ids = calibration_ids(full.tokenizer, samples=2, seq_len=32, seed=0)
    expected = amp_scores(full.model, ids)
    off = load_model(str(tiny_dir), device_map="auto", max_memory=SMALL).model
    assert offload.is_offloaded(off)
    for (q1, c1), (q2, c2) in zip(expected, amp_scores(off, ids)):
        assert torch.allclose(q1, q2, rtol=1e-5) and torch.allclose(c1, c2, rtol=1e-5)


@pytest.mark.parametrize("args,fragment", [
    (["eval", "{dir}", "--max-memory", "cpu=8XB"], "malformed --max-memory size"),
    (["eval", "{dir}", "--max-memory", "gpu=8MB"], "unknown device 'gpu'"),
    (["eval", "{dir}", "--device-map", "balanced"], "unknown --device-map"),
    (["profile", "tiny-llama", "--max-memory", "cpu=8MB"], "need a checkpoint directory"),
    (["convert", "{dir}", "--to", "gqa", "--kv-heads", "2", "--no-stream", "--max-memory", SMALL, "-o", "{out}"],
     "cannot rewrite the weights of a model offloaded"),
])
def test_bad_offload_options(tiny_dir, tmp_path, args, fragment):
    args = [a.format(dir=tiny_dir, out=tmp_path / "out") for a in args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
