"""Recipe schema: derived from the CLI commands, validated before anything runs, one-line errors (no torch)."""
from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import pytest
import typer.main
import yaml
from typer.testing import CliRunner

from seqtool.cli.app import app
from seqtool.cli.recipe_schema import (EXCLUDED_PARAMS, RecipeError, apply_sets, parse_recipe, step_specs)

ROOT = Path(__file__).resolve().parents[2]


def _commands_with_model():
    """Every registered command function that takes a MODEL, read from the functions' own signatures."""
    out = {}
    for info in app.registered_commands:
        params = inspect.signature(inspect.unwrap(info.callback)).parameters
        if "model" in params:
            out[info.name] = [p for p in params if p not in EXCLUDED_PARAMS]
    return out


def test_schema_covers_every_command_option():
    specs = step_specs()
    commands = _commands_with_model()
    assert set(specs) == set(commands) >= {"prune", "convert", "finetune", "patch", "eval", "profile", "inspect"}
    for name, params in commands.items():
        assert sorted(o.param for o in specs[name].options.values()) == sorted(params), name
    # keys are the long flags with underscores
    assert {"kv_heads", "from", "to", "attention_experts"} <= set(specs["convert"].options)
    assert specs["patch"].options["set"].kind == "list" and specs["prune"].options["ratio"].required
    assert specs["prune"].makes_checkpoint and not specs["eval"].makes_checkpoint


def test_a_new_option_joins_the_schema(monkeypatch):
    """Options come from the Typer app: a command option added later is a recipe key at once."""
    import seqtool.cli.recipe_schema as schema

    extra = typer.Typer()

    @extra.callback()
    def root() -> None:
        pass

    @extra.command("prune")
    def prune(model: str, ratio: Annotated[float, typer.Option("--ratio")],
              output: Annotated[str, typer.Option("--output", "-o")] = "",
              brand_new: Annotated[int, typer.Option("--brand-new")] = 3) -> None:
        pass

    schema.use_app(extra)
    try:
        assert schema.step_specs()["prune"].options["brand_new"].kind == "int"
    finally:
        schema.use_app(app)


def _parse(text: str, **kw):
    return parse_recipe(yaml.safe_load(text), source="r.yaml", **kw)


def test_values_are_coerced_to_the_option_types():
    recipe = _parse("""
model: ref
device: cpu
steps:
  - prune: {ratio: 0.2, seq_len: 1k}
  - convert: {to: gqa, kv_heads: "4"}
  - patch: {method: streaming, budget: 0.25, set: {min_len: 0, evict: true}, dense_layers: [0, 1]}
  - eval: {task: [ppl, passkey], seq_len: [512, 2k], fail_under: {passkey: 0.9}}
  - inspect
""")
    prune, convert, patch, ev, insp = recipe.steps
    assert prune.options == {"ratio": 0.2, "seq_len": 1024} and prune.effective["device"] == "cpu"
    assert convert.options["kv_heads"] == 4
    assert patch.options == {"method": "streaming", "budget": "0.25", "set": ["min_len=0", "evict=true"],
                             "dense_layers": "0,1"}
    assert ev.options == {"task": "ppl,passkey", "seq_len": "512,2k", "fail_under": "passkey=0.9"}
    assert insp.options == {} and recipe.to_dict()["steps"][4] == {"inspect": {}}


@pytest.mark.parametrize("text, words", [
    ("model: ref\nsteps: [{prnue: {ratio: 0.2}}]", ["step 1", "unknown step 'prnue'", "did you mean 'prune'"]),
    ("model: ref\nsteps: [{prune: {ratio: 0.2, ration: 1}}]", ["step 1 (prune)", "unknown key 'ration'"]),
    ("model: ref\nsteps: [{prune: {ratio: 0.2}}, {convert: {to: gqa, kv_heads: four}}]",
     ["step 2 (convert)", "'kv_heads'", "integer", "four"]),
    ("model: ref\nsteps: [{prune: {ratio: high}}]", ["step 1 (prune)", "'ratio'", "number"]),
    ("model: ref\nsteps: [{convert: {kv_heads: 2}}]", ["step 1 (convert)", "missing key 'to'"]),
    ("model: ref\nsteps: [{eval: {task: ppl}}, {prune: {ratio: 0.2}}]",
     ["step 2 (prune)", "step 1 (eval) makes none"]),
    ("model: ref\nsteps: [{finetune: {bf16: off}}]", ["step 1 (finetune)", "'bf16'", "quote"]),
    ("model: ref\nsteps: [{prune: {ratio: 0.2, output: x}}]", ["step 1 (prune)", "unknown key 'output'", "-o OUT"]),
    ("model: ref\nstep: []", ["unknown key 'step'", "did you mean 'steps'"]),
    ("model: ref\nsteps: []", ["'steps' must be a non-empty list"]),
    ("model: ref\nsteps: [{prune: 0.2}]", ["step 1 (prune)", "mapping"]),
])
def test_bad_recipes_are_one_line_errors(text, words):
    with pytest.raises(RecipeError) as info:
        _parse(text)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert info.value.exit_code == 2


def test_missing_model_uses_the_project_default_or_lists_presets():
    assert _parse("steps: [inspect]", defaults={"model": "tiny-llama", "dtype": "fp32"}).model == "tiny-llama"
    with pytest.raises(RecipeError, match="tiny-llama, .*ref"):
        _parse("steps: [inspect]")


def test_set_overrides_step_options():
    data = yaml.safe_load("model: ref\nsteps:\n  - prune: {ratio: 0.2}\n  - inspect\n")
    changed = apply_sets(data, ["1.ratio=0.5", "1.seq_len=2k", "2.json=true", "model=tiny-llama"])
    assert changed["steps"][0] == {"prune": {"ratio": 0.5, "seq_len": "2k"}} and changed["model"] == "tiny-llama"
    assert data["steps"][0] == {"prune": {"ratio": 0.2}}  # the input is not modified
    with pytest.raises(RecipeError, match="unknown key 'json'"):
        parse_recipe(changed)
    assert apply_sets(changed, ["1.seq_len=null"])["steps"][0] == {"prune": {"ratio": 0.5}}
    for bad, words in ((["5.ratio=1"], "has 2 step"), (["x.ratio=1"], "not a step number"), (["ratio"], "STEP.key")):
        with pytest.raises(RecipeError, match=words):
            apply_sets(data, bad)


def test_validate_cli_errors_are_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny-llama\nsteps:\n  - prune: {ratio: 0.2}\n  - convert: {to: gqa, kv_head: 2}\n")
    result = CliRunner().invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: step 2 (convert): unknown key 'kv_head'; did you mean 'kv_heads'? (keys: "
        + ", ".join(step_specs()["convert"].options) + ")"]
    (tmp_path / "broken.yaml").write_text("model: [\n")
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "broken.yaml")])
    assert result.exit_code == 2 and "not valid YAML at line" in result.stderr
    result = CliRunner().invoke(app, ["run", str(tmp_path / "nope.yaml"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_schema_errors_import_nothing_heavy(tmp_path):
    """Schema errors are found without importing torch (validate answers as fast as --help)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: ref\nsteps: [{eval: {}}, {prune: {ratio: 0.2}}]\n")
    code = ("import sys\nimport seqtool.cli.app\nfrom seqtool.cli.run_cmd import load\ntry:\n    load(sys.argv[1], None)\n"
            "except Exception as e:\n    print(type(e).__name__)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.split() == ["RecipeError", "[]"], out.stderr
