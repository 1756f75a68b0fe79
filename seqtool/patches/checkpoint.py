"""``seqtool patch``: write a checkpoint whose recipe re-applies an attention patch on ``seqtool.load``.

The weights are unchanged; the recipe step (``op: patch, runtime: true``) carries the method and its options.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seqtool.errors import BadInputError
from seqtool.patches.report import PatchReport, patch_report
from seqtool.patches.runtime import apply_patch
from seqtool.patches.spec import parse_set_options


@dataclass
class PatchResult:
    source: str
    method: str
    spec: str
    options: dict[str, Any]
    output: str | None
    report: PatchReport | None


def patch_checkpoint(source: str, method: str, *, budget: str | float | None = None,
                     dense_layers: str | list[int] | None = None, set_options: list[str] | None = None,
                     output: str | None = None, force: bool = False, in_place: bool = False,
                     report: bool = False, probe_tokens: int = 512, dtype: str = "auto",
                     device: str = "auto") -> PatchResult:
    """Load ``source``, check the patch applies, optionally report on a probe, save with the patch recipe."""
    from seqtool.arch.io import load_model, save_model

    if output is None and not in_place and not report:
        raise BadInputError("pass -o OUT (output directory), --in-place, or --report")
    options: dict[str, Any] = parse_set_options(set_options or [])
    if budget is not None:
        options["budget"] = budget
    if dense_layers is not None:
        options["dense_layers"] = dense_layers
    target = None
    if output is not None or in_place:
        from seqtool.arch.paths import check_source, in_place_target, prepare_output

        target = output if output is not None else in_place_target(source)
        resolved = check_source(source)
        prepare_output(target, force=force, in_place=in_place, source=source,
                       source_dir=resolved if isinstance(resolved, Path) else None)  # before loading anything
    loaded = load_model(source, dtype=dtype, device=device, apply_recipe=False)
    model = loaded.model
    handle = apply_patch(model, method, **options)  # validates every option before anything is written
    step, spec = handle.recipe_step(), handle.spec
    handle.remove()
    rep = patch_report(model, method, options, probe_tokens=probe_tokens, tokenizer=loaded.tokenizer) \
        if report else None
    out = None
    if target is not None:
        from seqtool.arch.io import resolve_dtype

        out = str(save_model(model, loaded.tokenizer, target, step=step, force=force, in_place=in_place,
                             source_dir=loaded.path, dtype=resolve_dtype(dtype) or loaded.source_dtype))
    return PatchResult(source, method, spec, step["options"], out, rep)
