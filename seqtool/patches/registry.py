"""The registry of patch methods: ``name -> AttentionMethod subclass``.

Methods register with the :func:`register_method` decorator in their own module; :func:`load_builtin_methods`
imports the built-in modules (lazily, so importing seqtool patches nothing and loads no method code).
"""
from __future__ import annotations

import importlib

from seqtool.errors import BadInputError

_METHODS: dict[str, type] = {}

#: Built-in method modules, imported on first lookup. A new method = a module here + its entry in this tuple.
BUILTIN_MODULES = (
    "seqtool.patches.dense",
    "seqtool.patches.streaming",
    "seqtool.patches.block_topk",
    "seqtool.patches.vertical_slash",
    "seqtool.patches.recycled",
    "seqtool.patches.hip",
    "seqtool.patches.infllm",
    "seqtool.patches.razor",
    "seqtool.patches.longheads",
    "seqtool.patches.act",
    "seqtool.patches.snapkv",
    "seqtool.patches.h2o",
    "seqtool.patches.expected_attention",
)
_loaded = False


def register_method(cls: type) -> type:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not getattr(cls, "name", ""):
        raise ValueError(f"{cls.__name__} needs a class attribute 'name'")
    _METHODS[cls.name] = cls
    return cls


def load_builtin_methods() -> None:
    global _loaded
    if _loaded:
        return
    for module in BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            # Methods still being written are simply absent; any other import failure is a bug and raises.
            if exc.name != module:
                raise
    _loaded = True


def get_method(name: str) -> type:
    load_builtin_methods()
    if name not in _METHODS:
        raise BadInputError(f"unknown attention method '{name}'; methods: {', '.join(list_methods())}")
    return _METHODS[name]


def list_methods() -> list[str]:
    load_builtin_methods()
    return sorted(_METHODS)
