import json

from typer.testing import CliRunner

from seqtool.cli.app import app


def test_eval_cli_end_to_end_json():
    res = CliRunner().invoke(app, ["eval", "tiny-llama", "--task", "all", "--seq-len", "1k", "--samples", "2",
                                   "--depths", "0,1", "--batch", "2", "--ppl-tokens", "1500", "--json",
                                   "--dtype", "fp32", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["tasks"] == ["ppl", "passkey", "niah", "multikey", "vt"]
    assert {(s["task"], s["depth"]) for s in out["scores"]} == {(t, d) for t in ("passkey", "niah", "multikey", "vt")
                                                               for d in (0.0, 1.0)}
    assert all(s["samples"] == 2 and 0 <= s["accuracy"] <= 1 for s in out["scores"])
    assert out["ppl"][0]["tokens"] == 1500 and out["ppl"][0]["ppl"] > 1
    assert len(out["details"]) == 16


def test_eval_cli_table_and_compare():
    res = CliRunner().invoke(app, ["eval", "tiny-llama", "--task", "passkey", "--seq-len", "512", "--samples", "1",
                                   "--depths", "0.5", "--compare", "tiny-llama", "--dtype", "fp32"])
    assert res.exit_code == 0, res.output
    assert "passkey" in res.stdout and "compared with tiny-llama" in res.stdout
    assert "+0" in res.stdout


def test_eval_cli_bad_task_is_one_line_error():
    res = CliRunner().invoke(app, ["eval", "tiny-llama", "--task", "nope"])
    assert res.exit_code == 2
    assert "unknown task" in res.output
