"""One parser for patch specs, shared by ``seqtool patch --set k=v`` and ``--attn M:k=v,...`` on profile/eval.

Grammar: ``METHOD[:key=value[,key=value...]]``. A comma-separated piece without ``=`` continues the previous value,
so list options read naturally: ``block_topk:budget=0.1,dense_layers=0,1,min_len=0``. Values stay strings here;
:func:`coerce_options` converts them with the method's dataclass field types.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from seqtool.errors import BadInputError


def parse_attn_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"block_topk:budget=0.25,min_len=0"`` → ``("block_topk", {"budget": "0.25", "min_len": "0"})``."""
    if not isinstance(spec, str) or not spec.strip():
        raise BadInputError("empty attention spec; use METHOD[:key=value,...], e.g. block_topk:budget=0.25")
    method, _, rest = spec.strip().partition(":")
    method = method.strip()
    if not method:
        raise BadInputError(f"attention spec '{spec}' has no method name; use METHOD[:key=value,...]")
    return method, parse_set_options(rest.split(",") if rest.strip() else [])


def parse_set_options(items: list[str]) -> dict[str, str]:
    """``["budget=0.1", "dense_layers=0", "1"]`` → ``{"budget": "0.1", "dense_layers": "0,1"}``."""
    options: dict[str, str] = {}
    last: str | None = None
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        if "=" in item:
            key, _, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not key:
                raise BadInputError(f"option '{item}' has no name; use key=value")
            if not value.strip():
                raise BadInputError(f"option '{key}' has an empty value; use {key}=VALUE")
            options[key] = value.strip()
            last = key
        elif last is not None:
            options[last] = f"{options[last]},{item}"
        else:
            raise BadInputError(f"option '{item}' is not key=value")
    return options


def format_attn_spec(method: str, options: dict[str, Any]) -> str:
    """The inverse of :func:`parse_attn_spec` (lists are written comma-separated)."""
    parts = []
    for key, value in options.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        parts.append(f"{key}={value}")
    return method + (":" + ",".join(parts) if parts else "")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    if not isinstance(value, str):
        return value
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        if value.lower() in ("none", "null", ""):
            return None
        for candidate in args:
            try:
                return _coerce(value, candidate, key)
            except BadInputError:
                continue
        raise BadInputError(f"option {key}={value!r} has the wrong type; see `seqtool patch --help` for its values")
    if origin in (list, tuple):
        inner = args[0] if args else str
        items = [v for v in value.replace(";", ",").replace("+", ",").split(",") if v.strip()]
        out = [_coerce(v.strip(), inner, key) for v in items]
        return tuple(out) if origin is tuple else out
    try:
        if annotation is bool:
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            as_float = float(value)
            if as_float != int(as_float):
                raise ValueError
            return int(as_float)
        if annotation is float:
            return float(value)
    except ValueError:
        hint = {bool: "true or false", int: "a whole number", float: "a number"}.get(annotation, annotation.__name__)
        raise BadInputError(f"option {key}={value!r} is not a valid {annotation.__name__}; use {hint}") from None
    return value


def coerce_options(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    """Convert string option values with the field types of dataclass ``cls``; unknown keys raise BadInputError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    out = {}
    for key, value in options.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise BadInputError(f"unknown option '{key}' for method '{getattr(cls, 'name', cls.__name__)}'; options: {known}")
        out[key] = _coerce(value, hints[key], key)
    return out
