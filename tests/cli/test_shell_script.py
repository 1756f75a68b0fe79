"""Runs seqtool the way a CI job does: a shell script of chained commands in real subprocesses."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ci_job.sh")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_chained_commands_in_a_shell_script(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ci job ok")
    assert json.loads((tmp_path / "inspect.json").read_text())["family"] == "llama"
    pruned = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert pruned["num_key_value_heads"] == 2
    assert [s["op"] for s in pruned["seqtool"]["steps"]] == ["convert", "prune"]
    patched = json.loads((tmp_path / "patched" / "config.json").read_text())
    assert [s["op"] for s in patched["seqtool"]["steps"]][-1] == "patch"
    profile = json.loads((tmp_path / "profile.json").read_text())
    assert profile["models"][0]["rows"][0]["status"] == "ok"
    json.loads((tmp_path / "eval.json").read_text())
    errors = (tmp_path / "err.txt").read_text().splitlines()
    assert all(line.startswith("error: ") for line in errors)
