"""Structural conversions (checkpoint rewrites): ``gqa`` (fewer KV heads) and ``prune`` (AMP heads + MLP channels).

    import seqtool
    result = seqtool.convert("tiny-llama", to="gqa", kv_heads=2, output="out-gqa")
    result = seqtool.prune("tiny-llama", ratio=0.3, criterion="amp", output="out-pruned")
    result.model  # the converted model; result.after / result.removed_ratio describe it

Every conversion is a :class:`~seqtool.convert.base.Conversion` registered by name in
:data:`~seqtool.convert.base.CONVERSIONS`; :func:`convert` runs any of them.
"""
from __future__ import annotations

import sys
import types

from seqtool.convert.base import CONVERSIONS, Conversion, ConvertResult, RecoveryResult, ShapeSummary, register
from seqtool.convert.pipeline import available, convert, load_conversions

__all__ = ["CONVERSIONS", "Conversion", "ConvertResult", "RecoveryResult", "ShapeSummary", "available", "convert",
           "register", "prune_model", "load_conversions"]


def prune_model(model, ratio: float, **options) -> ConvertResult:
    """AMP structured pruning; see :func:`seqtool.convert.pipeline.prune_model`."""
    from seqtool.convert.pipeline import prune_model as _prune

    return _prune(model, ratio, **options)


class _CallableModule(types.ModuleType):
    """Importing ``seqtool.convert.*`` rebinds the attribute ``seqtool.convert`` from the public function to this
    package (Python binds submodules onto their parent); making the package callable keeps
    ``seqtool.convert(model, to, ...)`` working either way."""

    def __call__(self, model, to, **options) -> ConvertResult:
        return convert(model, to, **options)


sys.modules[__name__].__class__ = _CallableModule
