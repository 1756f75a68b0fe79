"""The base shape of a structural conversion, the one registry of conversions, and the driver that runs one.

A conversion is a dataclass of its options with two override points: :meth:`Conversion.check` (fail early with a
one-line error) and :meth:`Conversion.apply` (rewrite the model's modules and config in place, optionally using
calibration token ids). :func:`convert` does everything around it: load, calibrate, apply, LoRA recovery, save
through :mod:`seqtool.arch.io`, and return a :class:`ConvertResult` that the CLI renders.
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from seqtool.arch.registry import get_family, kv_cache_bytes_per_token
from seqtool.convert.layout import attn_mlp_params, current_shape
from seqtool.errors import BadInputError

CONVERSIONS: dict[str, type["Conversion"]] = {}
ADAPTER_DIR = "lora_adapter"


def register(name: str):
    """Class decorator: make a :class:`Conversion` available as ``convert(model, to=name)``."""

    def wrap(cls: type["Conversion"]) -> type["Conversion"]:
        cls.name = name
        CONVERSIONS[name] = cls
        return cls

    return wrap


def available() -> list[str]:
    load_conversions()
    return sorted(CONVERSIONS)


@dataclass
class Conversion:
    """Options of one conversion. Subclasses set ``op`` (the recipe op), ``changed_kinds`` (the module kinds it
    rewrites: what ``--recover full|distill`` trains) and override ``check``/``apply``."""

    name: ClassVar[str] = ""
    op: ClassVar[str] = "convert"
    changed_kinds: ClassVar[tuple[str, ...]] = ("attention", "mlp")

    @property
    def needs_calibration(self) -> bool:
        return False

    def check(self, model: nn.Module) -> None:
        """Raise BadInputError if the options do not fit ``model`` (before any expensive work)."""

    def apply(self, model: nn.Module, calib_ids: torch.Tensor | None) -> dict:
        """Rewrite ``model`` in place; ``calib_ids`` is (samples, seq_len) when ``needs_calibration``.
        Returns JSON-able details for the result and the recipe step."""
        raise NotImplementedError

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


def _as_loaded(model: Any, tokenizer: Any, dtype: str, device: str):
    """A LoadedModel from a source string, a LoadedModel, or a bare PreTrainedModel (+ optional tokenizer)."""
    from seqtool.arch.io import LoadedModel, load_model

    if isinstance(model, (str, Path)):
        return load_model(str(model), dtype=dtype, device=device, apply_recipe=False)
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        get_family(model)
        return LoadedModel(model, tokenizer, getattr(model.config, "_name_or_path", "") or "<in-memory model>")
    raise BadInputError(f"cannot convert a {type(model).__name__}; pass a path, preset name or a transformers model")


def load_conversions() -> None:
    """Import the built-in conversions so they register themselves."""
    from seqtool.convert import gqa, prune  # noqa: F401


def make_conversion(to: str, options: dict) -> Conversion:
    """Instantiate registered conversion ``to`` with ``options``; unknown names/options are one-line errors."""
    load_conversions()
    if to not in CONVERSIONS:
        raise BadInputError(f"unknown conversion '{to}'; available: {', '.join(available())}")
    cls = CONVERSIONS[to]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise BadInputError(f"'{to}' does not take option(s) {', '.join(unknown)}; it takes {', '.join(sorted(names))}")
    try:
        return cls(**options)
    except TypeError as exc:  # a required option is missing
        raise BadInputError(f"'{to}': {exc}") from None


def convert(model: Any, to: str, *, output: str | Path | None = None, tokenizer: Any = None,
            calib: str | Path | None = None, samples: int = 50, seq_len: int = 128, seed: int = 0,
            recover: str | None = None, steps: int | None = None, recover_options: dict | None = None,
            run_dir: str | Path | None = None, resume: bool = False, progress: str = "off",
            force: bool = False, in_place: bool = False, dtype: str = "auto", device: str = "auto",
            **options: Any) -> ConvertResult:
    """Apply registered conversion ``to`` (``gqa``, ``prune``, ...) to ``model`` and optionally save it.

    ``model`` is a path / preset name / LoadedModel / transformers model (converted in place). Calibration uses
    ``samples`` windows of ``seq_len`` tokens from ``calib`` (a text file) or built-in text. ``recover="lora"``
    fine-tunes LoRA adapters for ``steps`` steps and merges them; with ``output`` the adapter is also saved in peft
    format under ``output/lora_adapter``; ``"full"`` trains the modules the conversion changed, ``"distill"`` the
    same with KL to the unconverted model (see :mod:`seqtool.convert.recover`; ``steps`` None = the mode's
    default; ``run_dir``/``resume`` make the recovery resumable). Conversion-specific ``options`` go to the
    conversion's dataclass.
    """
    from seqtool.convert import calib as calib_mod

    started = time.perf_counter()
    load_conversions()
    if to in CONVERSIONS and "seed" in {f.name for f in dataclasses.fields(CONVERSIONS[to])}:
        options.setdefault("seed", seed)  # conversions with their own randomness share the run's seed
    conversion = make_conversion(to, options)
    recover = None if recover in (None, "none") else recover
    if recover is not None and recover not in ("lora", "full", "distill"):
        raise BadInputError(f"unknown recovery '{recover}'; use lora, full or distill, or leave it out")
    if output is not None:
        from seqtool.arch.io import prepare_output

        loaded_path = Path(model).expanduser() if isinstance(model, (str, Path)) and Path(model).expanduser().is_dir() else None
        prepare_output(output, force=force, in_place=in_place, source_dir=loaded_path)  # fail before any work
    loaded = _as_loaded(model, tokenizer, dtype, device)
    net = loaded.model
    spec = get_family(net)
    conversion.check(net)
    before = shape_summary(net)

    calib_ids, calibration = None, None
    if conversion.needs_calibration:
        if loaded.tokenizer is None:
            raise BadInputError("calibration needs a tokenizer; pass tokenizer= with a bare model")
        calib_ids = calib_mod.calibration_ids(loaded.tokenizer, path=calib, samples=samples, seq_len=seq_len, seed=seed)
        calibration = {"source": str(calib) if calib else "built-in", "samples": samples, "seq_len": seq_len,
                       "seed": seed}
    was_training = net.training
    net.eval()
    teacher = None
    if recover == "distill":
        import copy

        teacher = copy.deepcopy(net)  # the model before the rewrite is the distillation teacher
    details = conversion.apply(net, calib_ids)
    after = shape_summary(net)

    recovery, adapter_tmp = None, None
    if recover is not None:
        from seqtool.convert.recover import recover as run_recovery

        if loaded.tokenizer is None:
            raise BadInputError("recovery needs a tokenizer; pass tokenizer= with a bare model")
        if output is not None and recover == "lora":
            out_parent = Path(output).expanduser().resolve().parent
            out_parent.mkdir(parents=True, exist_ok=True)
            adapter_tmp = Path(tempfile.mkdtemp(prefix=".seqtool-adapter-", dir=out_parent))
            shutil.rmtree(adapter_tmp)  # peft writes the directory itself
        recovery = run_recovery(net, loaded.tokenizer, recover, kinds=conversion.changed_kinds, teacher=teacher,
                                steps=steps, seed=seed, adapter_dir=adapter_tmp, run_dir=run_dir, resume=resume,
                                progress=progress, **(recover_options or {}))
        teacher = None
    net.train(was_training)

    step = {**conversion.step(), **{k: v for k, v in details.items() if k in _STEP_DETAIL_KEYS}}
    if calibration:
        step["calibration"] = calibration
    if recovery is not None:
        step["recover"] = {"method": recovery.method, "steps": recovery.steps, "rank": recovery.rank,
                           "lr": recovery.lr, "train": recovery.target_modules, "objectives": recovery.objectives,
                           "batch": recovery.batch_size, "seq_len": recovery.seq_len,
                           "data_fingerprint": recovery.data_fingerprint, "final_loss": recovery.loss_end}
    out_path = None
    if output is not None:
        from seqtool.arch.io import save_model

        try:
            out_path = save_model(net, loaded.tokenizer, output, step=step, force=force, in_place=in_place,
                                  source_dir=loaded.path)
            if adapter_tmp is not None:
                shutil.move(str(adapter_tmp), str(out_path / ADAPTER_DIR))
                recovery.adapter_dir = str(out_path / ADAPTER_DIR)
        finally:
            if adapter_tmp is not None and adapter_tmp.exists():
                shutil.rmtree(adapter_tmp, ignore_errors=True)
    removed = 1.0 - after.params_attn_mlp / before.params_attn_mlp
    result = ConvertResult(
        op=conversion.op, method=str(details.get("method", conversion.name)), source=str(loaded.source),
        family=spec.family, output=str(out_path) if out_path else None, before=before, after=after,
        removed_ratio=round(removed, 6), options=dataclasses.asdict(conversion), details=details,
        calibration=calibration, recovery=recovery, seconds=round(time.perf_counter() - started, 3),
    )
    object.__setattr__(result, "_model", net)
    object.__setattr__(result, "_tokenizer", loaded.tokenizer)
    return result


# Details small enough to belong in the recipe (the rest, e.g. per-layer kept indices, stays in the result).
_STEP_DETAIL_KEYS = ("method", "from_kv_heads", "kv_heads", "heads", "intermediate", "achieved_ratio", "groups")
