import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from seqtool.cli.app import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def test_inspect_json_is_machine_readable():
    result = run("inspect", "tiny-qwen3", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["family"] == "qwen3" and data["kv_heads"] == 2 and data["head_dim"] == 16
    assert data["kv_cache_bytes_per_1k_tokens"] == 2 * 2 * 2 * 16 * 4 * 1024


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.1-8b", "qwen2.5-7b", "mistral-7b",
                                  "tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-phi3"])
def test_inspect_every_preset(name):
    result = run("inspect", name)
    assert result.exit_code == 0, result.output
    assert "KV cache per 1k tokens" in result.stdout


def test_inspect_real_shape_counts():
    data = json.loads(run("inspect", "llama-3.1-8b", "--json").stdout)
    assert abs(data["params_total"] - 8.03e9) < 0.01e9
    # 32 layers x 2 x 8 KV heads x 128 x 2 bytes (bf16) x 1024 tokens = 128 MiB
    assert data["kv_cache_bytes_per_1k_tokens"] == 128 * 1024 * 1024


@pytest.mark.parametrize("args, fragment", [
    (["inspect", "/no/such/dir"], "no such directory"),
    (["inspect", "tiny-gpt"], "presets:"),
    (["inspect", "someorg/somemodel"], "offline"),
])
def test_bad_input_is_one_line_exit_2(args, fragment):
    result = run(*args)
    assert result.exit_code == 2
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]
    assert "Traceback" not in result.output


def test_unsupported_family_exit_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    result = run("inspect", str(tmp_path))
    assert result.exit_code == 2 and "bert" in result.stderr and "llama" in result.stderr


def test_debug_env_shows_traceback():
    proc = subprocess.run([sys.executable, "-m", "seqtool", "inspect", "/no/such/dir"], capture_output=True,
                          text=True, env={**__import__("os").environ, "SEQTOOL_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_version_and_help():
    assert run("--version").stdout.strip()
    help_text = run("inspect", "--help").stdout
    assert "Examples" in help_text
