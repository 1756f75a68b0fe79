"""A project's default model: ``[tool.seqtool]`` in ``./pyproject.toml`` (or ``./seqtool.toml``).

```toml
[tool.seqtool]
model = "ref"          # used when a command's MODEL argument is left out
device = "cpu"         # default of --device (an explicit --device wins)
dtype = "bf16"         # default of --dtype (an explicit --dtype wins)
```

``seqtool.toml`` takes the same keys at its top level (or under ``[tool.seqtool]``) and wins over
``pyproject.toml``. Only the current directory is read. The values reach the commands as click's ``default_map``,
so precedence is: command line > project file > the command's own default.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from seqtool.errors import BadInputError

KEYS = ("model", "device", "dtype")
FILES = ("seqtool.toml", "pyproject.toml")


def project_defaults(cwd: str | Path | None = None) -> tuple[dict[str, str], Path | None]:
    """``({"model": ..., "device": ..., "dtype": ...}, file)`` from the current directory ({} and None without one).

    A pyproject.toml without ``tool.seqtool`` is not even parsed (start-up stays fast, and an unrelated project's
    file cannot break seqtool). Unknown keys and non-string values are one-line errors naming the file."""
    root = Path(cwd) if cwd is not None else Path.cwd()
    for name in FILES:
        path = root / name
        try:
            text = path.read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError):
            continue
        if name == "pyproject.toml" and "tool.seqtool" not in text:
            continue
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise BadInputError(f"'{path}' is not valid TOML: {exc}") from None
        table: Any = data.get("tool", {}).get("seqtool") if isinstance(data.get("tool"), dict) else None
        if table is None and name == "seqtool.toml":
            table = {k: v for k, v in data.items() if k != "tool"}
        if table is None:
            continue
        where = f"'{path}'" + (" [tool.seqtool]" if name == "pyproject.toml" else "")
        if not isinstance(table, dict):
            raise BadInputError(f"{where} must be a table of model/device/dtype settings")
        unknown = sorted(set(table) - set(KEYS))
        if unknown:
            raise BadInputError(f"{where}: unknown setting '{unknown[0]}'; settings: {', '.join(KEYS)}")
        for key, value in table.items():
            if not isinstance(value, str) or not value.strip():
                raise BadInputError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
        return {k: table[k] for k in KEYS if k in table}, path
    return {}, None


def default_map(command_names, cwd: str | Path | None = None) -> dict[str, dict[str, str]]:
    """click ``default_map`` giving every command the project's model / device / dtype defaults (a command
    without such a parameter ignores them)."""
    defaults, _ = project_defaults(cwd)
    return {name: dict(defaults) for name in command_names} if defaults else {}


def missing_model_message() -> str:
    """The one line for a command run without MODEL and without a project default."""
    from seqtool.zoo.presets import preset_names

    return ("no MODEL given and no project default (set model in [tool.seqtool] of ./pyproject.toml or in "
            f"./seqtool.toml); pass a checkpoint directory or a preset: {', '.join(preset_names())}")
