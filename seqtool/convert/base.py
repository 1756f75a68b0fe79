"""The base shape of a structural conversion and the one registry of conversions.

A conversion is a dataclass of its options with two override points: :meth:`Conversion.check` (fail early with a
one-line error) and :meth:`Conversion.apply` (rewrite the model's modules and config in place, optionally using
calibration token ids). The conversions (``gqa``, ``prune``, ...) import this module and :func:`register`
themselves; :mod:`seqtool.convert.pipeline` imports them and runs one (``convert()``): nothing here imports a
conversion.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from seqtool.arch.registry import kv_cache_bytes_per_token
from seqtool.convert.layout import attn_mlp_params, current_shape

CONVERSIONS: dict[str, type["Conversion"]] = {}
ADAPTER_DIR = "lora_adapter"


def register(name: str):
    """Class decorator: make a :class:`Conversion` available as ``convert(model, to=name)``."""

    def wrap(cls: type["Conversion"]) -> type["Conversion"]:
        cls.name = name
        CONVERSIONS[name] = cls
        return cls

    return wrap


@dataclass
class Conversion:
    """Options of one conversion. Subclasses set ``op`` (the recipe op), ``changed_kinds`` (the module kinds it
    rewrites: what ``--recover full|distill`` trains) and override ``check``/``apply``."""

    name: ClassVar[str] = ""
    op: ClassVar[str] = "convert"
    changed_kinds: ClassVar[tuple[str, ...]] = ("attention", "mlp")
    # True for conversions that build a new checkpoint from seed models (moe, bam) through ``build`` instead of
    # rewriting one loaded model in place through ``check``/``apply``.
    builds: ClassVar[bool] = False
    tokenizer: ClassVar[Any] = None  # set by :func:`convert` before :meth:`apply` (the loaded model's tokenizer)

    @property
    def needs_calibration(self) -> bool:
        return False

    def check(self, model: nn.Module) -> None:
        """Raise BadInputError if the options do not fit ``model`` (before any expensive work)."""

    def apply(self, model: nn.Module, calib_ids: torch.Tensor | None) -> dict:
        """Rewrite ``model`` in place; ``calib_ids`` is (samples, seq_len) when ``needs_calibration``.
        Returns JSON-able details for the result and the recipe step."""
        raise NotImplementedError

    def build(self, model: Any, *, output: str | Path | None, **run: Any) -> "ConvertResult":
        """Build and (with ``output``) save a new checkpoint from ``model`` and the conversion's other seeds;
        ``run`` holds :func:`convert`'s keyword arguments (force, samples, seq_len, dtype, device, ...)."""
        raise NotImplementedError

    def result_model(self, model: nn.Module) -> nn.Module:
        """The model to save after :meth:`apply`: ``model`` itself, or a new one for conversions that change the
        model class (e.g. ``hybrid`` → GraniteMoeHybrid)."""
        return model

    def step(self) -> dict:
        """The recipe step (without details) describing these options."""
        return {"op": self.op, "to": self.name, **dataclasses.asdict(self)}


@dataclass
class ShapeSummary:
    """The numbers a conversion changes."""

    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    params_attn_mlp: int
    params_total: int
    kv_cache_bytes_per_token: int


@dataclass
class RecoveryResult:
    """A recovery fine-tune (``lora`` | ``full`` | ``distill``): losses are the mean of the first / last 10 % of
    steps; ``target_modules`` are the module kinds trained; perplexities on the data's held-out rows."""

    method: str
    steps: int
    rank: int | None
    alpha: int | None
    lr: float
    batch_size: int
    seq_len: int
    target_modules: list[str]
    loss_start: float
    loss_end: float
    seconds: float
    adapter_dir: str | None = None
    objectives: list = field(default_factory=list)
    data_fingerprint: str | None = None
    heldout_ppl_before: float | None = None
    heldout_ppl_after: float | None = None


@dataclass
class ConvertResult:
    """What a conversion did. The converted model itself is ``result.model`` (not a field: not serialised)."""

    op: str
    method: str
    source: str
    family: str
    output: str | None
    before: ShapeSummary
    after: ShapeSummary
    removed_ratio: float
    options: dict
    details: dict = field(default_factory=dict)
    calibration: dict | None = None
    recovery: RecoveryResult | None = None
    seconds: float = 0.0

    @property
    def model(self):
        return getattr(self, "_model", None)

    @property
    def tokenizer(self):
        return getattr(self, "_tokenizer", None)


def shape_summary(model: nn.Module) -> ShapeSummary:
    heads, kv_heads, head_dim, intermediate = current_shape(model)
    element = next(model.parameters()).element_size()
    return ShapeSummary(heads, kv_heads, head_dim, intermediate, attn_mlp_params(model),
                        sum(p.numel() for p in model.parameters()), kv_cache_bytes_per_token(model.config, element))


_STEP_DETAIL_KEYS = ("method", "from_kv_heads", "kv_heads", "heads", "intermediate", "achieved_ratio", "groups")
