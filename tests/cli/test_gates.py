"""CI gates: eval --fail-under / profile --fail-over exit 1 with one line; unknown metrics exit 2."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from seqtool.cli.app import app
from seqtool.cli.gates import EVAL_TASKS, Gate, failures, parse_gates
from seqtool.errors import BadInputError

EVAL = {"seq_lens": [256, 512],
        "ppl": [{"seq_len": 256, "ppl": 35.0, "nll": 3.55}, {"seq_len": 512, "ppl": 42.0, "nll": 3.74}],
        "scores": [{"task": "passkey", "seq_len": 256, "depth": 0.0, "samples": 3, "accuracy": 1.0},
                   {"task": "passkey", "seq_len": 256, "depth": 1.0, "samples": 1, "accuracy": 0.0},
                   {"task": "passkey", "seq_len": 512, "depth": 0.5, "samples": 4, "accuracy": 1.0}]}
PROFILE = {"models": [{"rows": [{"seq_len": 1024, "status": "ok", "prefill_median_s": 0.5, "kv_cache_bytes": 10},
                                {"seq_len": 4096, "status": "oom", "prefill_median_s": None}]}],
           "comparison": None}


def test_eval_directions_and_the_worst_length_decides():
    assert failures(parse_gates("passkey=0.75,ppl=50", "eval"), EVAL, "eval") == []
    assert failures(parse_gates("passkey=0.8", "eval"), EVAL, "eval") == [
        "passkey 0.75 at 256 tokens is below the threshold 0.8"]  # (3 x 1.0 + 1 x 0.0) / 4 samples
    assert failures(parse_gates("ppl=40", "eval"), EVAL, "eval") == ["ppl 42 at 512 tokens is above the threshold 40"]
    assert failures(parse_gates("passkey=1.5", "eval"), EVAL, "eval") != []  # outside the range: simply fails
    assert failures(parse_gates("niah=0.5", "eval"), EVAL, "eval") == ["niah was not measured (gate niah=0.5)"]


def test_profile_gates_read_ratios_with_compare_and_own_numbers_without():
    assert failures([Gate("prefill", 1.0, "lower")], PROFILE, "profile") == [
        "prefill was not measured at 4096 tokens (oom) (gate prefill=1)"]
    compared = {**PROFILE, "comparison": [{"seq_len": 1024, "prefill_ratio": 0.93, "kv_cache_ratio": 0.5}]}
    assert failures(parse_gates("prefill=0.8", "profile"), compared, "profile") == [
        "prefill ratio 0.93 at 1024 tokens is above the threshold 0.8"]
    assert failures(parse_gates("kv_cache=0.5", "profile"), compared, "profile") == []


@pytest.mark.parametrize("text, command, kw, words", [
    ("passkye=0.9", "eval", {}, "unknown metric 'passkye' for eval; metrics: ppl, nll, passkey"),
    ("passkey", "eval", {}, "'passkey' needs a number"),
    ("passkey=0.9", "eval", {"tasks": "ppl"}, "--fail-under passkey needs --task passkey (or all)"),
    ("ppl=4", "profile", {}, "--fail-over: unknown metric 'ppl' for profile"),
])
def test_bad_gates_are_bad_input(text, command, kw, words):
    with pytest.raises(BadInputError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_gates(text, command, **kw)


def test_eval_tasks_match_the_library():
    from seqtool.eval import ALL_TASKS

    assert EVAL_TASKS == tuple(ALL_TASKS)


def test_eval_gate_exits_1_with_one_line_and_unknown_metric_exits_2():
    args = ["--quiet", "eval", "tiny-llama", "--task", "ppl", "--seq-len", "64", "--ppl-tokens", "128"]
    result = CliRunner().invoke(app, [*args, "--fail-under", "ppl=1"])
    assert result.exit_code == 1 and "ppl" in result.stdout  # the table is printed, then the gate fails
    line, = result.stderr.strip().splitlines()
    assert line.startswith("error: gate failed: ppl ") and line.endswith("at 64 tokens is above the threshold 1")
    assert CliRunner().invoke(app, [*args, "--fail-under", "ppl=1e9"]).exit_code == 0
    result = CliRunner().invoke(app, [*args, "--fail-under", "perplexity=3"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "unknown metric 'perplexity'" in result.stderr
