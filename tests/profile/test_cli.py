"""`seqtool profile` through Typer's CliRunner (in-process)."""
from __future__ import annotations

import csv
import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from seqtool.cli.app import app
from seqtool.profile import run as run_mod

FAST = ["--decode-tokens", "2", "--warmup", "0", "--repeats", "1"]


@pytest.fixture
def in_process(monkeypatch):
    """Keep CLI tests in this process (the subprocess path has its own tests)."""
    real = run_mod.profile_model
    monkeypatch.setattr(run_mod, "profile_model", lambda *a, **k: real(*a, isolate=False, **k))


def invoke(*args):
    return CliRunner().invoke(app, list(args))


def test_table(in_process):
    result = invoke("profile", "tiny-llama", "--seq-len", "128", "--threads", "1", *FAST)
    assert result.exit_code == 0, result.output
    for header in ("prefill p50", "TTFT", "decode/token", "peak memory", "KV cache", "TFLOP/s"):
        assert header in result.stdout
    assert "128" in result.stdout and "peak RSS increase" in result.stdout


def test_json_sweep_compare_csv_plot(in_process, tmp_path):
    csv_file, png = tmp_path / "rows.csv", tmp_path / "plot.png"
    result = invoke("profile", "tiny-llama", "--sweep", "32,64", "--compare", "tiny-qwen2", *FAST, "--json",
                    "--csv", str(csv_file), "--plot", str(png))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [m["source"] for m in data["models"]] == ["tiny-llama", "tiny-qwen2"]
    assert [r["seq_len"] for r in data["models"][0]["rows"]] == [32, 64]
    assert data["comparison"][0]["kv_cache_ratio"] == pytest.approx(0.5)
    assert {"device_name", "torch_version", "transformers_version", "threads"} <= set(data["environment"])
    rows = list(csv.DictReader(csv_file.open()))
    assert len(rows) == 4 and rows[0]["model"] == "tiny-llama" and rows[3]["seq_len"] == "64"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_table_and_breakdown(in_process):
    result = invoke("profile", "tiny-llama", "--seq-len", "32", "--compare", "tiny-mistral", "--breakdown", *FAST)
    assert result.exit_code == 0, result.output
    assert "ratios tiny-mistral / tiny-llama" in result.stdout
    assert "prefill time by module kind" in result.stdout and "lm_head" in result.stdout


def test_oom_row_in_table(in_process, monkeypatch):
    def measure(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99 GB")

    monkeypatch.setattr(run_mod, "measure_length", measure)
    result = invoke("profile", "tiny-llama", "--sweep", "32,64", *FAST)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("OOM") == 2


@pytest.mark.parametrize("args, text", [
    (["--seq-len", "32q"], "malformed length '32q'"),
    (["--batch", "-1"], "--batch must be"),
    (["--threads", "0"], "--threads must be"),
    (["--seq-len", "1k", "--sweep", "1k,2k"], "either --seq-len or --sweep"),
    (["--dtype", "fp8"], "unknown dtype"),
    (["--device", "cuda"], "no CUDA GPU"),
    (["--csv", "/nonexistent-dir/x.csv"], "does not exist"),
])
def test_bad_input_is_one_line_exit_2(args, text):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = invoke("profile", "tiny-llama", *args)
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and text in result.stderr
    assert result.stderr.startswith("error: ")


def test_unknown_model_exit_2():
    result = invoke("profile", "no-such-model-dir")
    assert result.exit_code == 2 and result.stderr.startswith("error: ")


def test_plot_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = invoke("profile", "tiny-llama", "--plot", str(tmp_path / "p.png"))
    assert result.exit_code == 2 and "seqtool[plot]" in result.stderr
