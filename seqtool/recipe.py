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
    from seqtool.version import __version__

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


# --- `seqtool run` recipes -------------------------------------------------------------------------------------
# A checkpoint written by `seqtool run` also carries the recipe that made it (the model and the rewrite steps up
# to it, as written in the recipe file) and that recipe's step hash, beside "steps" in the same "seqtool" block:
# `seqtool run CKPT_DIR -o OUT` replays it. A later single command (prune, patch, ...) rewrites the block through
# :func:`write` and so drops them: the checkpoint is then no longer what that recipe makes.
RUN_RECIPE_KEY = "recipe"
RUN_HASH_KEY = "recipe_hash"


def read_run_recipe(config: Any) -> tuple[dict | None, str | None]:
    """``(recipe, step_hash)`` stored by ``seqtool run`` on a config (object or dict); (None, None) if none."""
    value = config.get(RECIPE_KEY) if isinstance(config, dict) else getattr(config, RECIPE_KEY, None)
    if isinstance(value, dict) and isinstance(value.get(RUN_RECIPE_KEY), dict):
        return value[RUN_RECIPE_KEY], value.get(RUN_HASH_KEY)
    return None, None


def attach_run_recipe(checkpoint_dir: Any, run_recipe: dict, step_hash: str) -> None:
    """Add ``run_recipe`` and ``step_hash`` to the checkpoint's ``config.json`` (and a section to its model card).
    Called on a checkpoint that is not published yet (the runner's temp directory); each file is replaced
    atomically."""
    from pathlib import Path

    root = Path(checkpoint_dir)
    config_file = root / "config.json"
    config = json.loads(config_file.read_text())
    block = config.get(RECIPE_KEY) if isinstance(config.get(RECIPE_KEY), dict) else {"version": _version(), "steps": []}
    block[RUN_RECIPE_KEY] = run_recipe
    block[RUN_HASH_KEY] = step_hash
    config[RECIPE_KEY] = block
    _replace_text(config_file, json.dumps(config, indent=2, sort_keys=True) + "\n")
    card = root / "README.md"
    if card.exists():
        text = card.read_text()
        section = ("\n## Made by `seqtool run`\n\nReproduce with `seqtool run THIS_DIR -o OUT` (recipe below, step hash "
                   f"`{step_hash}`):\n\n```json\n{json.dumps(run_recipe, indent=2)}\n```\n")
        _replace_text(card, text.rstrip("\n") + "\n" + section)


def _replace_text(path: Any, text: str) -> None:
    import os

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
