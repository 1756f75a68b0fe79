"""The recipe schema, read from the CLI commands themselves, and the validation of a recipe against it.

A recipe names a model and an ordered list of steps; each step is one seqtool command that takes a MODEL
(``prune``, ``convert``, ``finetune``, ``patch``, ``eval``, ``profile``, ``inspect``) with exactly that command's
options, spelled as the long flag with underscores (``--kv-heads`` → ``kv_heads``, ``--from`` → ``from``)::

    model: ref
    steps:
      - prune: {ratio: 0.2}
      - convert: {to: gqa, kv_heads: 4}
      - eval: {task: ppl, seq_len: 512}

The allowed keys, their types and which are required come from the Typer commands (so a new option joins
recipes by itself); ``-o/--output``, ``--force``, ``--in-place`` and ``--json`` are the runner's business. A step
whose command writes a checkpoint (it has ``-o``) is a *rewrite* and works on the previous step's checkpoint, so
it must follow the model or another rewrite; measurement steps (eval, profile, inspect) measure the latest
checkpoint (``--dry-run`` of a command is left to ``seqtool run --dry-run``). Steps are numbered from 1 in
messages, ``--set`` and output directories. No torch here.
"""
from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from typing import Any

from seqtool.errors import BadInputError

# The runner's own business: where steps write, and printing/planning modes (`seqtool run --dry-run` plans them all).
EXCLUDED_PARAMS = ("model", "output", "force", "in_place", "json_out", "dry_run")
TOP_KEYS = ("model", "device", "dtype", "steps")
_KIND_NAMES = {"int": "an integer (or a length like 2k)", "float": "a number", "str": "a string",
               "bool": "true or false", "list": "a list of strings (or a key: value mapping)"}


class RecipeError(BadInputError):
    """A recipe that does not match the schema (exit 2, before anything runs)."""


@dataclass(frozen=True)
class OptionSpec:
    """One option of a step: ``key`` as written in recipes, ``param`` the command function's parameter name."""

    key: str
    param: str
    kind: str  # int | float | str | bool | list
    required: bool
    default: Any
    help: str = ""


@dataclass(frozen=True)
class StepSpec:
    name: str
    options: dict[str, OptionSpec]
    makes_checkpoint: bool  # the command writes a checkpoint (-o): a rewrite step

    def param_of(self, key: str) -> str:
        return self.options[key].param


@dataclass
class Step:
    """A validated step: ``options`` as given (coerced), ``effective`` with the recipe's device/dtype added."""

    index: int  # 1-based
    name: str
    options: dict[str, Any]
    effective: dict[str, Any]
    spec: StepSpec

    @property
    def label(self) -> str:
        return f"step {self.index} ({self.name})"


@dataclass
class Recipe:
    model: str
    steps: list[Step]
    device: str | None = None
    dtype: str | None = None
    source: str = "recipe"

    def to_dict(self) -> dict:
        """The recipe as written (plain JSON/YAML data), with the defaults it was run with made explicit."""
        out: dict[str, Any] = {"model": self.model}
        if self.device is not None:
            out["device"] = self.device
        if self.dtype is not None:
            out["dtype"] = self.dtype
        out["steps"] = [{s.name: dict(s.options)} for s in self.steps]
        return out


def _kind(annotation: Any) -> str:
    origin = getattr(annotation, "__origin__", None)
    if origin in (list, tuple):
        return "list"
    return {int: "int", float: "float", bool: "bool"}.get(annotation, "str")


def _key(param) -> str:
    longs = [o for o in param.opts if o.startswith("--")]
    return max(longs, key=len)[2:].replace("-", "_") if longs else param.name


_APP: list[Any] = []  # the Typer app whose commands are the steps (set by run_cmd.register: no import of cli.app)


def use_app(app: Any) -> None:
    """Make ``app``'s commands the recipe steps (called when the ``run`` command is registered on it)."""
    _APP[:] = [app]
    step_specs.cache_clear()


@functools.lru_cache(maxsize=1)
def step_specs() -> dict[str, StepSpec]:
    """Every CLI command that takes a MODEL argument, with its options (introspected from the Typer app)."""
    import typer.main

    if not _APP:
        raise RuntimeError("no CLI app registered for recipe steps: import seqtool.cli.app first")
    group = typer.main.get_command(_APP[0])
    specs = {}
    for name, command in sorted(group.commands.items()):
        params = {p.name: p for p in getattr(command, "params", [])}
        if "model" not in params or params["model"].param_type_name != "argument":
            continue
        options = {}
        for p in command.params:
            if p.name in EXCLUDED_PARAMS or p.param_type_name != "option":
                continue
            kind = "list" if p.multiple else _kind(p.type_descriptor.annotation)
            options[_key(p)] = OptionSpec(_key(p), p.name, kind, bool(p.required), p.default, p.help or "")
        specs[name] = StepSpec(name, options, makes_checkpoint="output" in params)
    return specs


def _scalar_text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def coerce(value: Any, option: OptionSpec, where: str) -> Any:
    """``value`` from YAML as the option's type: lengths like "2k" for integers, numbers and lists for strings
    (``seq_len: [1k, 2k]`` → "1k,2k"; ``fail_under: {ppl: 40}`` → "ppl=40"), a mapping for repeatable options
    (``set: {min_len: 0}`` → ["min_len=0"]). None keeps the command's default."""
    from seqtool.utils import parse_length

    def bad(extra: str = "") -> RecipeError:
        return RecipeError(f"{where}: '{option.key}' must be {_KIND_NAMES[option.kind]}, got {value!r}{extra}")

    if value is None:
        if option.required:
            raise bad()
        return None
    kind = option.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad()
        return value
    if kind == "int":
        if isinstance(value, bool) or isinstance(value, float):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return parse_length(value)
            except BadInputError:
                raise bad() from None
        raise bad()
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad()
        try:
            return float(value)
        except ValueError:
            raise bad() from None
    if kind == "list":
        if isinstance(value, dict):
            return [f"{k}={_scalar_text(v)}" for k, v in value.items()]
        if isinstance(value, (list, tuple)) and all(not isinstance(v, (dict, list)) for v in value):
            return [_scalar_text(v) for v in value]
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return [str(value)]
        raise bad()
    # str
    if isinstance(value, bool):
        raise bad(" (YAML reads on/off/yes/no as booleans: quote the value)")
    if isinstance(value, (int, float, str)):
        return str(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str)) and not isinstance(v, bool)
                                                 for v in value):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict) and all(not isinstance(v, (dict, list)) for v in value.values()):
        return ",".join(f"{k}={_scalar_text(v)}" for k, v in value.items())
    raise bad()


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _split_step(raw: Any, index: int) -> tuple[str, Any]:
    where = f"step {index}"
    if isinstance(raw, str):
        return raw, None
    if isinstance(raw, dict) and len(raw) == 1:
        (name, options), = raw.items()
        return str(name), options
    raise RecipeError(f"{where}: write a step as '- NAME: {{key: value, ...}}' (one step name per item), "
                      f"got {raw!r}"[:300])


def parse_recipe(data: Any, *, source: str = "recipe", defaults: dict[str, str] | None = None) -> Recipe:
    """Validate recipe ``data`` (parsed YAML/JSON) against :func:`step_specs`; ``defaults`` (the project's
    model/device/dtype) fill what the recipe leaves out. Raises a one-line :class:`RecipeError`."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with 'model' and 'steps', got {type(data).__name__}")
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise RecipeError(f"{source}: unknown key '{unknown[0]}'{_suggest(str(unknown[0]), TOP_KEYS)} "
                          f"(keys: {', '.join(TOP_KEYS)})")
    defaults = defaults or {}
    settings = {}
    for key in ("model", "device", "dtype"):
        value = data.get(key, defaults.get(key))
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise RecipeError(f"{source}: '{key}' must be a non-empty string, got {value!r}")
        settings[key] = value
    if settings["model"] is None:
        from seqtool.cli.project import missing_model_message

        raise RecipeError(f"{source}: no 'model' key and " + missing_model_message().removeprefix("no MODEL given and "))
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise RecipeError(f"{source}: 'steps' must be a non-empty list of steps, e.g. '- prune: {{ratio: 0.2}}'")
    specs = step_specs()
    steps: list[Step] = []
    for index, raw in enumerate(raw_steps, 1):
        name, options = _split_step(raw, index)
        if name not in specs:
            raise RecipeError(f"step {index}: unknown step '{name}'{_suggest(name, specs)} (steps: {', '.join(specs)})")
        spec = specs[name]
        where = f"step {index} ({name})"
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise RecipeError(f"{where}: options must be a mapping {{key: value}}, got {options!r}"[:300])
        given: dict[str, Any] = {}
        for key, value in options.items():
            key = str(key)
            if key not in spec.options:
                hint = _suggest(key, spec.options) or _suggest(key.replace("-", "_"), spec.options)
                if key in ("output", "o", "force", "in_place", "json"):
                    hint = "; the runner sets outputs itself (seqtool run ... -o OUT)"
                raise RecipeError(f"{where}: unknown key '{key}'{hint} (keys: {', '.join(spec.options)})")
            coerced = coerce(value, spec.options[key], where)
            if coerced is not None:
                given[key] = coerced
        for key, option in spec.options.items():
            if option.required and key not in given:
                raise RecipeError(f"{where}: missing key '{key}' (required by seqtool {name})")
        effective = dict(given)
        for key in ("device", "dtype"):
            if settings[key] is not None and key in spec.options and key not in effective:
                effective[key] = settings[key]
        if index > 1 and spec.makes_checkpoint and not steps[-1].spec.makes_checkpoint:
            prev = steps[-1]
            raise RecipeError(f"{where}: needs a checkpoint to rewrite, but step {prev.index} ({prev.name}) makes none; "
                              "put measurement steps (eval, profile, inspect) after the rewrites")
        steps.append(Step(index, name, given, effective, spec))
    return Recipe(settings["model"], steps, settings["device"], settings["dtype"], source=source)


def apply_sets(data: Any, sets: list[str] | None) -> Any:
    """``--set STEP.key=value`` (``--set 2.kv_heads=2``; 1-based) or ``--set model=ref`` on the raw recipe data;
    the value is read as YAML (``0.3`` a number, ``2k`` a string, ``null`` drops the key)."""
    if not sets:
        return data
    import copy

    import yaml

    data = copy.deepcopy(data)
    if not isinstance(data, dict):
        return data
    for item in sets:
        target, eq, text = item.partition("=")
        if not eq or not target.strip():
            raise RecipeError(f"--set '{item}': use STEP.key=value (e.g. 2.kv_heads=4) or model=NAME")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        target = target.strip()
        if "." not in target:
            if target not in ("model", "device", "dtype"):
                raise RecipeError(f"--set '{item}': '{target}' is not a recipe setting; use STEP.key=value or "
                                  "model=/device=/dtype=")
            data[target] = value
            continue
        index_text, _, key = target.partition(".")
        steps = data.get("steps")
        try:
            index = int(index_text)
        except ValueError:
            raise RecipeError(f"--set '{item}': '{index_text}' is not a step number (steps count from 1)") from None
        if not isinstance(steps, list) or not 1 <= index <= len(steps):
            count = len(steps) if isinstance(steps, list) else 0
            raise RecipeError(f"--set '{item}': the recipe has {count} step(s); steps count from 1")
        raw = steps[index - 1]
        if isinstance(raw, str):
            raw = steps[index - 1] = {raw: {}}
        if not isinstance(raw, dict) or len(raw) != 1:
            continue  # parse_recipe reports the malformed step
        (name, options), = raw.items()
        if options is None:
            options = raw[name] = {}
        if isinstance(options, dict):
            if value is None:
                options.pop(key, None)
            else:
                options[key] = value
    return data


def load_recipe_file(path: str) -> Any:
    """The parsed YAML (or JSON) of a recipe file; a missing or malformed file is a one-line error."""
    from pathlib import Path

    import yaml

    file = Path(path)
    if not file.is_file():
        raise RecipeError(f"recipe '{path}' does not exist" if not file.exists() else f"recipe '{path}' is not a file")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe '{path}': {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"recipe '{path}' is not valid YAML{where}: {problem}") from None
