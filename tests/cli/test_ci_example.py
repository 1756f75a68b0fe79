"""examples/ci.sh: a whole CI job with quality and speed gates on tiny-llama, run as a user runs it."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "ci.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_ci_example_passes_its_gates(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ci gates passed" and proc.stderr == ""
    comparison = json.loads((tmp_path / "profile.json").read_text())["comparison"][0]
    assert comparison["kv_cache_ratio"] <= 0.8
    assert json.loads((tmp_path / "eval.json").read_text())["ppl"][0]["ppl"] <= 1000
