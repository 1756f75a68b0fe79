"""The base shape of a structural conversion, the one registry of conversions, and the driver that runs one.

A conversion is a dataclass of its options with two override points: :meth:`Conversion.check` (fail early with a
one-line error) and :meth:`Conversion.apply` (rewrite the model's modules and config in place, optionally using
calibration token ids). :func:`convert` does everything around it: load, calibrate, apply, LoRA recovery, save
through :mod:`seqtool.arch.io`, and return a :class:`ConvertResult` that the CLI renders.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
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


def load_conversions() -> None:
    """Import the built-in conversions so they register themselves."""
    from seqtool.convert import bam, gqa, hybrid, moe, prune  # noqa: F401


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
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if options.get(n) is None]
    if missing:
        flags = ", ".join("--" + n.replace("_", "-") for n in missing)
        raise BadInputError(f"--to {to} needs {flags}")
    return cls(**options)


def convert(model: Any, to: str, *, output: str | Path | None = None, tokenizer: Any = None,
            calib: str | Path | None = None, samples: int = 50, seq_len: int = 128, seed: int = 0,
            recover: str | None = None, steps: int | None = None, recover_options: dict | None = None,
            run_dir: str | Path | None = None, resume: bool = False, progress: str = "off",
            force: bool = False, in_place: bool = False, dtype: str = "auto", device: str = "auto",
            stream: bool | None = False, max_shard_size: str | int = "2GB", **options: Any) -> ConvertResult:
    """Apply registered conversion ``to`` (``gqa``, ``prune``, ...) to ``model`` and optionally save it.

    ``model`` is a path / preset name / LoadedModel / transformers model (converted in place). Calibration uses
    ``samples`` windows of ``seq_len`` tokens from ``calib`` (a text file) or built-in text. ``recover="lora"``
    fine-tunes LoRA adapters for ``steps`` steps and merges them; with ``output`` the adapter is also saved in peft
    format under ``output/lora_adapter``; ``"full"`` trains the modules the conversion changed, ``"distill"`` the
    same with KL to the unconverted model (see :mod:`seqtool.convert.recover`; ``steps`` None = the mode's
    default; ``run_dir``/``resume`` make the recovery resumable). Conversion-specific ``options`` go to the
    conversion's dataclass. ``stream=True`` rewrites a checkpoint directory into ``output`` one layer at a time
    (:mod:`seqtool.convert.streamed`; ``result.model`` is then None), ``None`` streams only when the model would
    not fit in memory; ``max_shard_size`` caps the written safetensors shards.
    """
    from seqtool.arch.io import ADAPTER_TMP_PREFIX, temp_name
    from seqtool.convert import calib as calib_mod

    from seqtool.arch.offload import parse_size

    started = time.perf_counter()
    max_shard_size = parse_size(max_shard_size, "--max-shard-size")
    load_conversions()
    fields = {f.name for f in dataclasses.fields(CONVERSIONS[to])} if to in CONVERSIONS else set()
    if "seed" in fields:
        options.setdefault("seed", seed)  # conversions with their own randomness share the run's seed
    if recover in (None, "none"):  # conversions that train themselves (hybrid) own the run dir and progress
        for name, value in (("run_dir", run_dir), ("resume", resume), ("progress", progress)):
            if name in fields:
                options.setdefault(name, value)
    conversion = make_conversion(to, options)
    recover = None if recover in (None, "none") else recover
    if conversion.builds:
        if recover is not None:
            raise BadInputError(f"--to {to} does not take --recover; fine-tune the result with `seqtool finetune`")
        return conversion.build(model, output=output, tokenizer=tokenizer, calib=calib, samples=samples,
                                seq_len=seq_len, force=force, in_place=in_place, dtype=dtype, device=device)
    if recover is not None and recover not in ("lora", "full", "distill"):
        raise BadInputError(f"unknown recovery '{recover}'; use lora, full or distill, or leave it out")
    from seqtool.arch import offload

    if stream is False and offload.active() is not None:
        raise BadInputError(f"{'prune' if to == 'prune' else f'convert --to {to}'} cannot rewrite the weights of a "
                            "model offloaded with --device-map/--max-memory in place; drop --no-stream (it then "
                            "streams the rewrite) or those options")
    if stream is not False:
        from seqtool.convert.streamed import convert_stream_or_none

        result = convert_stream_or_none(conversion, model, output=output, stream=stream, recover=recover,
                                        in_place=in_place, force=force, dtype=dtype, calib=calib, samples=samples,
                                        seq_len=seq_len, seed=seed, max_shard_size=max_shard_size)
        if result is not None:
            return result
    from seqtool.arch.io import prepare_output, resolve_dtype, resolve_source

    save_dtype = resolve_dtype(dtype)
    if output is not None:
        source_dir = None
        if isinstance(model, (str, Path)):
            resolved = resolve_source(str(model))  # an unknown model is reported before output problems
            source_dir = resolved if isinstance(resolved, Path) else None
        prepare_output(output, force=force, in_place=in_place, source_dir=source_dir,
                       source=str(model) if isinstance(model, (str, Path)) else None)  # fail before any work
    from seqtool.arch.io import as_loaded

    loaded = as_loaded(model, tokenizer, dtype=dtype, device=device, verb="convert")
    net = loaded.model
    spec = get_family(net)
    from seqtool.arch.offload import require_not_offloaded

    require_not_offloaded(net, f"convert --to {to}" if to != "prune" else "prune")
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
    conversion.tokenizer = loaded.tokenizer  # conversions that train (hybrid distillation) read their data with it
    details = conversion.apply(net, calib_ids)
    net = conversion.result_model(net)
    after = shape_summary(net)

    recovery, adapter_tmp = None, None
    if recover is not None:
        from seqtool.convert.recover import recover as run_recovery

        if loaded.tokenizer is None:
            raise BadInputError("recovery needs a tokenizer; pass tokenizer= with a bare model")
        if output is not None and recover == "lora":
            out_parent = Path(output).expanduser().resolve().parent
            out_parent.mkdir(parents=True, exist_ok=True)
            adapter_tmp = out_parent / temp_name(ADAPTER_TMP_PREFIX)
            adapter_tmp.mkdir()
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
    if output is not None and int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 writes
        from seqtool.arch.io import apply_umask, save_model

        try:
            out_path = save_model(net, loaded.tokenizer, output, step=step, force=force, in_place=in_place,
                                  source_dir=loaded.path, dtype=save_dtype or loaded.source_dtype,
                                  max_shard_size=max_shard_size)
            if adapter_tmp is not None:
                shutil.move(str(adapter_tmp), str(out_path / ADAPTER_DIR))
                apply_umask(out_path / ADAPTER_DIR)
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
