"""Recipes: the list of seqtool steps that made a checkpoint, stored in ``config.json`` under ``"seqtool"``.

A step is a JSON dict with at least ``op`` (``convert``, ``prune``, ``patch``, ...). Steps with
``"runtime": true`` (attention patches) change no weights; ``seqtool.load`` re-applies them.
"""
from __future__ import annotations

import datetime as _dt
import json
from typing import Any

RECIPE_KEY = "seqtool"


def _version() -> str:
    from seqtool import __version__

    return __version__


def read(config: Any) -> list[dict]:
    """The recipe steps stored on a config (object or dict); [] when seqtool did not make it."""
    value = config.get(RECIPE_KEY) if isinstance(config, dict) else getattr(config, RECIPE_KEY, None)
    if isinstance(value, dict):
        return list(value.get("steps", []))
    return []


def write(config: Any, steps: list[dict]) -> None:
    setattr(config, RECIPE_KEY, {"version": _version(), "steps": steps})


def make_step(step: dict) -> dict:
    """A recipe step with the seqtool version and a UTC timestamp added."""
    if "op" not in step:
        raise ValueError("a recipe step needs an 'op'")
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {**step, "seqtool_version": _version(), "time": stamp}


def runtime_steps(steps: list[dict]) -> list[dict]:
    return [s for s in steps if s.get("runtime")]


def reapply_runtime_steps(model: Any, steps: list[dict]) -> None:
    """Re-apply runtime (attention patch) steps recorded in a recipe."""
    if not runtime_steps(steps):
        return
    from seqtool.patches import reapply_from_recipe

    reapply_from_recipe(model, steps)


def model_card(model: Any, steps: list[dict], extra: str = "") -> str:
    """A README.md describing how the checkpoint was made."""
    config = model.config
    lines = [
        "---",
        "library_name: transformers",
        "tags: [seqtool]",
        "---",
        f"# {getattr(config, 'model_type', 'model')} checkpoint written by seqtool",
        "",
        f"Architecture: `{type(model).__name__}`, {getattr(config, 'num_hidden_layers', '?')} layers, "
        f"hidden {getattr(config, 'hidden_size', '?')}, {getattr(config, 'num_attention_heads', '?')} heads, "
        f"{getattr(config, 'num_key_value_heads', '?')} KV heads.",
        "",
        "## Recipe",
        "",
    ]
    if not steps:
        lines.append("No seqtool steps: saved as loaded.")
    for i, step in enumerate(steps, 1):
        details = {k: v for k, v in step.items() if k not in ("op", "seqtool_version", "time")}
        lines.append(f"{i}. `{step['op']}` {json.dumps(details, sort_keys=True)} (seqtool {step.get('seqtool_version')}, {step.get('time')})")
    if runtime_steps(steps):
        lines += [
            "",
            "**Runtime attention patch.** The weights are unchanged; plain `transformers` loads this checkpoint and runs",
            "dense attention. Load it with `seqtool.load(path)` to get the patched attention back.",
        ]
    lines += ["", "Load with `transformers.AutoModelForCausalLM.from_pretrained(path)` or `seqtool.load(path)`.", ""]
    if extra:
        lines += [extra, ""]
    return "\n".join(lines)
