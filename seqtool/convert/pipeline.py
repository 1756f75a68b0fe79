"""The driver that runs any registered conversion: ``convert()`` loads, calibrates, applies, recovers (LoRA /
full / distill, :mod:`seqtool.convert.recover`), saves through :mod:`seqtool.arch.io` (or streams,
:mod:`seqtool.convert.streamed`) and returns a :class:`~seqtool.convert.base.ConvertResult` that the CLI renders.

It sits above the conversions: it imports them (:func:`load_conversions`), they import only
:mod:`seqtool.convert.base`.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any

from seqtool.arch.registry import get_family
from seqtool.convert.base import _STEP_DETAIL_KEYS, ADAPTER_DIR, CONVERSIONS, Conversion, ConvertResult, shape_summary
from seqtool.errors import BadInputError


def available() -> list[str]:
    load_conversions()
    return sorted(CONVERSIONS)


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


def prune_model(model, ratio: float, **options) -> ConvertResult:
    """Prune ``ratio`` of the attention + MLP parameters of ``model`` (path / preset / LoadedModel / module).

    Options: ``target``, ``criterion``, ``round_to``, ``gqa_unit`` (see :class:`PruneConversion`) and everything
    :func:`seqtool.convert.convert` takes (``output``, ``calib``, ``samples``, ``seq_len``, ``seed``,
    ``recover="lora"``, ``steps``, ``force``, ``in_place``, ``dtype``, ``device``, ``tokenizer``).
    """
    return convert(model, "prune", ratio=ratio, **options)
