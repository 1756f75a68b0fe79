"""`seqtool run RECIPE.yaml -o OUT` and `seqtool validate RECIPE.yaml`: chains of seqtool steps (docs/recipes.md)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from seqtool.cli.common import JsonOpt, emit, handle_errors, is_quiet, log

RecipeArg = Annotated[str, typer.Argument(help="Recipe file (YAML), or a checkpoint written by seqtool run (replays the recipe that made it).", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a step option: STEP.key=value (steps count from 1, value read as YAML; null drops the key), or model=/device=/dtype=. Repeatable.", show_default=False)]


def load(recipe_arg: str, sets: list[str] | None):
    """Parse and validate a recipe file or a checkpoint's stored recipe (schema only: no torch)."""
    from seqtool.cli.project import project_defaults
    from seqtool.cli.recipe_schema import RecipeError, apply_sets, load_recipe_file, parse_recipe

    path = Path(recipe_arg)
    if path.is_dir():
        import json

        from seqtool.recipe import read, read_run_recipe

        config_file = path / "config.json"
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError):
            raise RecipeError(f"'{recipe_arg}' is a directory without a readable config.json; pass a recipe file "
                              "or a checkpoint written by seqtool run") from None
        data, _ = read_run_recipe(config)
        if data is None:
            made = ", ".join(s.get("op", "?") for s in read(config)) or "no seqtool steps"
            raise RecipeError(f"checkpoint '{recipe_arg}' carries no seqtool run recipe ({made}); only checkpoints "
                              "written by 'seqtool run' can be replayed")
        source = f"recipe of {recipe_arg}"
    else:
        data, source = load_recipe_file(recipe_arg), recipe_arg
    defaults, _ = project_defaults()
    return parse_recipe(apply_sets(data, sets), source=source, defaults=defaults)


def _plan(recipe, json_out: bool) -> None:
    """--dry-run: the memory plan of seqtool.plan (predicts peaks without loading weights)."""
    from seqtool.errors import NotImplementedMethodError

    try:
        from seqtool.plan import plan_recipe
    except ImportError:
        raise NotImplementedMethodError("--dry-run needs seqtool.plan, which this installation does not have") from None
    device = recipe.device or "cpu"
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = plan_recipe(recipe.model, [(s.name, dict(s.effective)) for s in recipe.steps], device=device,
                       dtype=recipe.dtype)
    emit(plan.to_dict() if json_out else plan, json_out, lambda p: p.render())


def _validated_render(recipe) -> str:
    from seqtool.cli.common import table

    rows = [(s.index, s.name, "rewrite" if s.spec.makes_checkpoint else "measure",
             ", ".join(f"{k}={v}" for k, v in s.effective.items())) for s in recipe.steps]
    return table(rows, ["step", "name", "kind", "options"]) + f"\n\n{recipe.source}: valid ({len(recipe.steps)} steps on {recipe.model})"


def _validated_json(recipe) -> dict[str, Any]:
    return {"valid": True, "source": recipe.source, "recipe": recipe.to_dict(),
            "steps": [{"index": s.index, "name": s.name, "rewrite": s.spec.makes_checkpoint, "options": s.effective}
                      for s in recipe.steps]}


def register(app: typer.Typer) -> None:
    from seqtool.cli.recipe_schema import use_app

    use_app(app)

    @app.command("run")
    @handle_errors
    def run_command(
        recipe: RecipeArg,
        output: Annotated[str | None, typer.Option("--output", "-o", help="Run directory: each step writes OUT/NN-step/ (a checkpoint, or result.json for eval/profile/inspect); finished steps are skipped on a re-run.", show_default=False)] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate, then print the memory plan of every step without loading weights (no -o needed).")] = False,
        set_: SetOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Run a recipe: a model and an ordered list of seqtool steps, each with its command's options.

        Steps: prune, convert, finetune, patch (rewrites, in a chain) then eval, profile, inspect (measure the
        latest checkpoint); option names are the long flags with underscores, lengths as 512 or "2k". The whole
        recipe is checked before the first step runs. Each checkpoint carries its recipe: `seqtool run CKPT -o OUT`
        reproduces it. Eval/profile gates (fail_under / fail_over) stop the run with exit 1. A recipe:

          model: ref
          steps:
            - prune: {ratio: 0.2}
            - convert: {to: gqa, kv_heads: 4}
            - eval: {task: ppl, seq_len: 512, fail_under: {ppl: 40}}

        Examples:
          seqtool run recipe.yaml -o runs/r1
          seqtool run recipe.yaml -o runs/r1                        # again: finished steps are skipped
          seqtool run recipe.yaml --set 2.kv_heads=2 -o runs/r2      # one option changed: steps 2.. re-run
          seqtool run recipe.yaml --dry-run                          # peak memory per step, nothing loaded
          seqtool run runs/r1/03-patch -o runs/repro                 # replay the recipe that made a checkpoint
        """
        from seqtool.errors import BadInputError

        parsed = load(recipe, set_)
        if output is None and not dry_run:
            raise BadInputError("pass -o OUT (the run directory), or --dry-run")
        from seqtool.cli.recipe_steps import preflight

        preflight(parsed)
        if dry_run:
            _plan(parsed, json_out)
            return
        from seqtool.cli.recipe_run import render, run_recipe

        log(f"running {len(parsed.steps)} step(s) of {parsed.source} on {parsed.model} -> {output}")
        emit(run_recipe(parsed, output, quiet=is_quiet()), json_out, render)

    @app.command("validate")
    @handle_errors
    def validate_command(recipe: RecipeArg, set_: SetOpt = None, json_out: JsonOpt = False) -> None:
        """Check a recipe without running it: steps, keys, types, the chain of checkpoints, and each step's
        values as its command checks them (model, conversion, patch method, tasks, gates, device, dtype).

        Examples:
          seqtool validate recipe.yaml
          seqtool validate recipe.yaml --set 1.ratio=0.5 --json
        """
        parsed = load(recipe, set_)
        from seqtool.cli.recipe_steps import preflight

        preflight(parsed)
        emit(_validated_json(parsed) if json_out else parsed, json_out, _validated_render)
