"""Latency / memory / KV-cache / FLOP measurement (``seqtool profile``).

``seqtool.profile`` is both this package and the public function: importing the package makes Python bind
``seqtool.profile`` to the module, so the module itself is callable (``seqtool.profile("tiny-llama", ...)``).
"""
import sys
import types

from seqtool.profile.results import ComparisonRow, Environment, LengthResult, ModelProfile, ProfileReport
from seqtool.profile.run import profile_model

__all__ = ["profile_model", "ProfileReport", "ModelProfile", "LengthResult", "Environment", "ComparisonRow"]


class _CallableModule(types.ModuleType):
    def __call__(self, source: str, **kwargs) -> ProfileReport:
        """Same as :func:`seqtool.profile.run.profile_model`."""
        return profile_model(source, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
