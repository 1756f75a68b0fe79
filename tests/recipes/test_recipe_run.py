"""seqtool run: steps through the library, outputs under OUT, re-runs skip finished steps, a checkpoint replays
its own recipe bit-identically, gates, preflight before any work, --dry-run through seqtool.plan."""
from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from seqtool.cli.app import app
from seqtool.cli.recipe_schema import Step, step_specs
from seqtool.cli.recipe_steps import build_call

RECIPE = """model: tiny-llama
steps:
  - prune: {ratio: 0.3, samples: 2, seq_len: 32}
  - convert: {to: gqa, kv_heads: 1}
  - patch: {method: streaming, budget: 64, set: {min_len: 0}}
  - eval: {task: ppl, seq_len: 64, ppl_tokens: 128}
"""


def _run(*args):
    result = CliRunner().invoke(app, ["--quiet", *map(str, args)])
    return result


def _statuses(result) -> list[str]:
    assert result.exit_code == 0, result.output
    return [s["status"] for s in json.loads(result.stdout)["steps"]]


def _weights(directory: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(directory.glob("*.safetensors"))}


def test_run_skips_finished_steps_and_a_checkpoint_reproduces_itself(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "run"
    assert _statuses(_run("run", recipe, "-o", out, "--json")) == ["ran"] * 4
    assert sorted(p.name for p in out.iterdir()) == ["01-prune", "02-convert", "03-patch", "04-eval"]
    config = json.loads((out / "03-patch" / "config.json").read_text())
    assert config["num_key_value_heads"] == 1
    assert [s["op"] for s in config["seqtool"]["steps"]] == ["prune", "convert", "patch"]
    assert [next(iter(s)) for s in config["seqtool"]["recipe"]["steps"]] == ["prune", "convert", "patch"]
    assert "seqtool run" in (out / "03-patch" / "README.md").read_text()
    measured = json.loads((out / "04-eval" / "result.json").read_text())
    assert measured["input"] == str(out / "03-patch") and measured["result"]["ppl"][0]["seq_len"] == 64

    assert _statuses(_run("run", recipe, "-o", out, "--json")) == ["skipped"] * 4
    # one option changed: that step and everything after it re-run
    changed = _run("run", recipe, "-o", out, "--json", "--set", "2.kv_heads=2")
    assert _statuses(changed) == ["skipped", "ran", "ran", "ran"]
    assert json.loads((out / "03-patch" / "config.json").read_text())["num_key_value_heads"] == 2

    again = _run("run", out / "03-patch", "-o", tmp_path / "repro", "--json")
    assert _statuses(again) == ["ran"] * 3  # the checkpoint's recipe: its rewrites, not the eval
    assert _weights(tmp_path / "repro" / "03-patch") == _weights(out / "03-patch") != {}
    made = json.loads((out / "03-patch" / "config.json").read_text())["seqtool"]
    stored = json.loads((tmp_path / "repro" / "03-patch" / "config.json").read_text())["seqtool"]
    assert stored["recipe"]["steps"][1] == {"convert": {"to": "gqa", "kv_heads": 2}}
    assert stored["recipe_hash"] == made["recipe_hash"] != config["seqtool"]["recipe_hash"]


def test_gates_fail_the_run_after_saving_the_result(tmp_path):
    recipe = tmp_path / "gate.yaml"
    recipe.write_text("model: tiny-llama\nsteps:\n  - eval: {task: ppl, seq_len: 64, ppl_tokens: 128, "
                      "fail_under: {ppl: 1}}\n")
    out = tmp_path / "run"
    failed = _run("run", recipe, "-o", out)
    assert failed.exit_code == 1
    line, = failed.stderr.strip().splitlines()
    assert line.startswith("error: step 1 (eval): gate failed: ppl ") and "above the threshold 1" in line
    assert (out / "01-eval" / "result.json").exists()
    assert _run("run", recipe, "-o", out).exit_code == 1  # skipped, the gate still reads the saved result
    assert _statuses(_run("run", recipe, "-o", out, "--json", "--set", "1.fail_under=ppl=1e9")) == ["skipped"]


@pytest.mark.parametrize("step, words", [
    ("convert: {to: gqa, kv_heads: 2, mixer: linear}", "step 2 (convert): 'gqa' does not take option(s) mixer"),
    ("convert: {to: gqqa, kv_heads: 2}", "step 2 (convert): unknown conversion 'gqqa'"),
    ("patch: {method: streeming}", "step 2 (patch): unknown method 'streeming'"),
    ("eval: {task: pplx}", "step 2 (eval): unknown task 'pplx'"),
    ("eval: {task: ppl, fail_under: {passkey: 0.9}}", "step 2 (eval): fail_under passkey needs --task passkey"),
    ("profile: {fail_over: {prefil: 0.8}}", "step 2 (profile): fail_over: unknown metric 'prefil'"),
    ("prune: {ratio: 1.5}", "step 2 (prune): ratio must be in (0, 1)"),
])
def test_step_values_are_checked_before_any_work(tmp_path, step, words):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: tiny-llama\nsteps:\n  - prune: {{ratio: 0.3}}\n  - {step}\n")
    result = _run("run", recipe, "-o", tmp_path / "run")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: {words}" + result.stderr.strip().split(words, 1)[1]]
    assert not (tmp_path / "run").exists()


def test_replaying_needs_a_run_recipe_and_out_is_a_run_directory(tmp_path):
    result = _run("run", "seqtool/zoo/ref", "-o", tmp_path / "x")
    assert result.exit_code == 2 and "carries no seqtool run recipe" in result.stderr
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-llama\nsteps: [inspect]\n")
    result = _run("run", recipe, "-o", "seqtool/zoo/ref")
    assert result.exit_code == 2 and "is a checkpoint; -o takes a run directory" in result.stderr
    assert _run("run", recipe).exit_code == 2


def test_dry_run_hands_the_validated_steps_to_seqtool_plan(tmp_path, monkeypatch):
    calls = []

    class Plan:
        def to_dict(self):
            return {"peak": 1}

        def render(self):
            return "plan: peak memory 1 B"

    def plan_recipe(model, steps, *, device="cpu", dtype=None):
        calls.append((model, steps, device, dtype))
        return Plan()

    monkeypatch.setitem(sys.modules, "seqtool.plan", types.SimpleNamespace(plan_recipe=plan_recipe))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-llama\ndtype: fp32\nsteps:\n  - prune: {ratio: 0.3}\n  - eval: {seq_len: 2k}\n")
    result = _run("run", recipe, "--dry-run")
    assert result.exit_code == 0 and result.stdout.strip() == "plan: peak memory 1 B"
    assert calls == [("tiny-llama", [("prune", {"ratio": 0.3, "dtype": "fp32"}),
                                     ("eval", {"seq_len": "2k", "dtype": "fp32"})], "cpu", "fp32")]
    assert json.loads(_run("run", recipe, "--dry-run", "--json").stdout) == {"peak": 1}
    monkeypatch.setitem(sys.modules, "seqtool.plan", None)
    result = _run("run", recipe, "--dry-run")
    assert result.exit_code == 1 and result.stderr.strip() == (
        "error: --dry-run needs seqtool.plan, which this installation does not have")


SAMPLES = {("eval", "seq_len"): "2k", ("eval", "depths"): "0.5", ("profile", "seq_len"): "1k",
           ("profile", "sweep"): "1k,2k", ("eval", "fail_under"): "ppl=4", ("profile", "fail_over"): "prefill=1"}
BASE = {"prune": {"ratio": 0.3}, "convert": {"to": "gqa"}, "patch": {"method": "streaming"}}


def _sample(name, option):
    if (name, option.key) in SAMPLES:
        return SAMPLES[(name, option.key)]
    return {"int": 7, "float": 0.5, "str": "x7", "bool": True, "list": ["a=1"]}[option.kind]


def _library_function(name):
    from seqtool.arch.inspect import inspect_model
    from seqtool.eval.runner import evaluate
    from seqtool.patches.checkpoint import patch_checkpoint
    from seqtool.profile.run import profile_model
    from seqtool.train.finetune import finetune

    return {"eval": evaluate, "profile": profile_model, "finetune": finetune, "patch": patch_checkpoint,
            "inspect": inspect_model}.get(name)


def test_every_option_reaches_the_library():
    """Each option of each step changes the library call, under a name the library function takes."""
    from seqtool.convert.base import CONVERSIONS
    from seqtool.convert.pipeline import convert, load_conversions

    load_conversions()
    generic = set(inspect.signature(convert).parameters)
    for name, spec in step_specs().items():
        base = dict(BASE.get(name, {}))
        plain = build_call(Step(1, name, base, base, spec), "m", "out")
        for key, option in spec.options.items():
            options = {**base, key: _sample(name, option)}
            call = build_call(Step(1, name, options, options, spec), "m", "out")
            assert (call.args, call.kwargs, call.post, call.threads, call.offload) != (
                plain.args, plain.kwargs, plain.post, plain.threads, plain.offload), (name, key)
            function = _library_function(name)
            if function is not None:
                inspect.signature(function).bind(*call.args, **call.kwargs)
            else:  # prune / convert: convert()'s own options plus the conversion's fields
                fields = {f.name for c in CONVERSIONS.values() for f in dataclasses.fields(c)}
                assert set(call.kwargs) <= generic | fields, (name, key)


def test_a_model_directory_is_recorded_by_its_absolute_path(monkeypatch):
    from seqtool.cli.recipe_run import model_identity

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    relative = model_identity("seqtool/zoo/ref")
    assert relative == model_identity(str(root / "seqtool" / "zoo" / "ref"))
    assert relative[0] == str(root / "seqtool" / "zoo" / "ref")
    assert model_identity("ref")[0] == "ref" and model_identity("ref")[1] != relative[1]


def test_a_failed_step_leaves_finished_steps_and_no_partial_output(tmp_path, monkeypatch):
    from seqtool.cli import recipe_steps
    from seqtool.errors import SeqtoolError

    def broken(*args, **kwargs):
        raise SeqtoolError("the measurement broke")

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-llama\nsteps: [inspect, {eval: {task: ppl}}]\n")
    monkeypatch.setitem(recipe_steps.FUNCTIONS, "eval", broken)
    result = _run("run", recipe, "-o", tmp_path / "run")
    assert result.exit_code == 1 and result.stderr.strip() == "error: the measurement broke"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["01-inspect"]  # no temp dir, no 02-eval
    monkeypatch.undo()
    monkeypatch.setitem(recipe_steps.FUNCTIONS, "eval", lambda *a, **k: {"ppl": [], "seq_lens": []})
    assert _statuses(_run("run", recipe, "-o", tmp_path / "run", "--json")) == ["skipped", "ran"]


def test_a_recipe_without_model_uses_the_project_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "seqtool.toml").write_text("model = 'tiny-qwen2'\ndtype = 'fp32'\n")
    (tmp_path / "r.yaml").write_text("steps: [{prune: {ratio: 0.3}}, inspect]\n")
    result = _run("validate", "r.yaml", "--json")
    assert result.exit_code == 0, result.output
    checked = json.loads(result.stdout)
    assert checked["recipe"]["model"] == "tiny-qwen2" and checked["steps"][0]["options"]["dtype"] == "fp32"


def test_dry_run_of_the_example_recipe_plans_every_step_without_loading_weights():
    """The shipped recipe through the real seqtool.plan: one plan row per step, a peak memory each."""
    result = _run("run", "examples/recipe.yaml", "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    steps = plan["steps"]
    assert [s["command"] for s in steps] == ["prune", "convert", "patch", "eval", "profile"]
    assert all(s["peak_bytes"] > 0 for s in steps)
    assert steps[0]["params_delta"] < 0  # prune 0.2 removes MLP channels
    assert steps[1]["kv_bytes_per_token"] * 2 == steps[0]["kv_bytes_per_token"]  # 8 -> 4 KV heads
    assert "peak memory" in _run("run", "examples/recipe.yaml", "--dry-run").stdout


def test_a_bad_max_memory_fails_before_any_step_runs(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-llama\nsteps: [inspect, {eval: {task: ppl, max_memory: cpu=lots}}]\n")
    result = _run("run", recipe, "-o", tmp_path / "run")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "step 2" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()
