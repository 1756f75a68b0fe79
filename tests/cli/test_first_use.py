"""First use (issue 18): a failed profile measurement is exit 1, time estimates and --max-seconds, status lines
off a terminal, nothing heavy imported for --help or argument errors, no ``<bool>`` in help."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from seqtool.cli import common
from seqtool.cli.app import app
from seqtool.profile import run as run_mod
from seqtool.profile.memory import ChildOutcome

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--decode-tokens", "1", "--warmup", "0", "--repeats", "1"]


def test_failed_measurement_exits_1_with_its_error_on_stderr(monkeypatch):
    tail = "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: kernel exploded"
    monkeypatch.setattr(run_mod, "run_in_subprocess", lambda spec: ChildOutcome(None, False, 1, tail))
    result = CliRunner().invoke(app, ["profile", "tiny-llama", "--seq-len", "32", *FAST])
    assert result.exit_code == 1, result.output
    errors = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and "kernel exploded" in errors[0] and "Traceback" not in result.output
    assert "ERROR" in result.stdout  # the row is still in the table


def test_oom_rows_still_exit_0(monkeypatch):
    monkeypatch.setattr(run_mod, "run_in_subprocess", lambda spec: ChildOutcome(None, True, -9, ""))
    result = CliRunner().invoke(app, ["profile", "tiny-llama", "--seq-len", "32", *FAST])
    assert result.exit_code == 0 and "OOM" in result.stdout


def test_estimates_and_max_seconds():
    report = run_mod.profile_model("tiny-llama", sweep="32,1k", isolate=False, max_seconds=1e-4, decode_tokens=1,
                                   warmup=0, repeats=1)
    rows = report.models[0].rows
    assert all(r.estimated_seconds and r.estimated_seconds > 0 for r in rows)
    assert rows[1].estimated_seconds > rows[0].estimated_seconds
    skipped = [r for r in rows if r.status == "skipped"]
    assert skipped and all("--max-seconds" in r.note for r in skipped)
    started = []
    run_mod.profile_model("tiny-llama", seq_len=32, isolate=False, decode_tokens=1, warmup=0, repeats=1,
                          on_start=lambda *a: started.append(a))
    assert started and started[0][:2] == ("tiny-llama", 32) and started[0][2] > 0


def test_status_lines_off_terminal(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with common.status_lines("eval passkey 2048", total=4, interval=0.05) as advance:
        advance(2)
        time.sleep(0.3)
    lines = [l for l in err.getvalue().splitlines() if l]
    assert lines and lines[-1].startswith("eval passkey 2048: step 2/4,") and "ETA" in lines[-1]


def test_cli_start_imports_nothing_heavy():
    """--help and argument errors must stay fast: importing the CLI, and rejecting a bad model, loads neither
    torch nor transformers (new commands keep their heavy imports inside the command function)."""
    code = ("import sys\nfrom seqtool.cli import app, common\n"
            "try:\n    common.check_model('tiny-gpt')\nexcept Exception:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]", out.stderr


def test_help_has_no_bool_placeholder():
    text = CliRunner().invoke(app, ["patch", "--help"], env={"COLUMNS": "200"}).stdout
    assert "--report" in text and "<bool>" not in text
    assert "<int>" in text  # value options keep theirs


def test_eval_render_says_what_took_the_time():
    from seqtool.cli.eval_cmd import render
    from seqtool.eval.results import EvalResult

    result = EvalResult(model="ref", tasks=["ppl"], seq_lens=[2048], depths=[0.5], samples=4, seed=0, attn=None)
    result.seconds = 12.5
    assert "eval of ref" in render(result) and "12.5 s" in render(result)


def test_unknown_conversion_is_rejected_without_torch(tmp_path):
    """A mistyped --to is an argument error: answered before torch is imported (and the CLI's list of conversion
    names is the registry's)."""
    from seqtool.cli.convert_cmd import CONVERSION_NAMES
    from seqtool.convert import available

    assert sorted(CONVERSION_NAMES) == available()
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom seqtool.cli.app import app\n"
            "r = CliRunner().invoke(app, ['convert', 'tiny-llama', '--to', 'hybridd'])\n"
            "print(r.exit_code, sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "2 []", (out.stdout, out.stderr)
