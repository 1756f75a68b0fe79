"""``--dry-run`` for the commands that have one: print the step's plan (seqtool.plan) instead of running it."""
from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from seqtool.cli.common import to_jsonable

DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan instead: shapes, parameter deltas, KV bytes per token and the predicted peak memory, from meta tensors (no weights loaded, nothing written).")]


def print_plan(model: str, command: str, options: dict[str, Any], *, device: str, dtype: str,
               json_out: bool) -> None:
    """Plan ``command`` with ``options`` (unset ones left to the command's defaults) on ``model`` and print it."""
    from seqtool.plan import plan_recipe

    options = {k: v for k, v in options.items() if v is not None}
    plan = plan_recipe(model, [(command, options)], device=device, dtype=None if dtype == "auto" else dtype)
    if json_out:
        print(json.dumps(to_jsonable(plan.to_dict()), indent=2))
    else:
        print(plan.render())
