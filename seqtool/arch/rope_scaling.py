"""Context extension: a new maximum context and a RoPE scaling written as transformers' ``rope_parameters``.

``plan_context_extension(config, "8k", "linear:4")`` decides; ``apply_context_extension(model, plan)`` writes the
config and rebuilds the rotary embeddings, so the model in memory, the saved checkpoint and a plain
``transformers`` reload all use the same RoPE.

- ``linear:F`` (position interpolation, LongLoRA's choice): ``rope_type=linear, factor=F``;
  ``max_position_embeddings`` = the new context.
- ``yarn:F``: also ``original_max_position_embeddings`` = the trained context (what YaRN scales from).
- ``dynamic:F`` (NTK): transformers' dynamic RoPE starts scaling only past ``max_position_embeddings``, so that
  key keeps the trained context (the threshold) and the new context is recorded in the recipe step only; writing
  the new context there would make the scaling a no-op up to it.
- No ``--rope-scale`` (or a type without ``:F``): factor = new context / the trained context where seqtool knows
  it (a recipe step with ``context``, or the shipped ``ref``: 2048), else / ``max_position_embeddings``; the
  type is yarn (linear for a model already scaled linearly): on ``ref`` 2k -> 8k, yarn:4 keeps passkey 1.00 before
  any training, linear:4 loses it and no recipe tried brings it back (docs/long_context.md).
  A factor <= 1 leaves RoPE unchanged.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from seqtool import recipe as recipe_mod
from seqtool.errors import BadInputError
from seqtool.utils import parse_length

ROPE_TYPES = ("linear", "dynamic", "yarn")
DEFAULT_ROPE_TYPE = "yarn"  # without --rope-scale TYPE (see the module docstring)


@dataclass
class ContextPlan:
    """What a context extension writes. ``rope_parameters`` None = RoPE unchanged."""

    context: int
    max_position_embeddings: int
    rope_parameters: dict[str, Any] | None
    factor: float
    rope_type: str | None
    factor_source: str  # e.g. "given", "8192 / trained context 2048 (ref model)"
    trained_context: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.rope_parameters is None:
            return f"context {self.context}: RoPE unchanged (factor {self.factor:g} <= 1, {self.factor_source})"
        return f"context {self.context}: RoPE {self.rope_type} x{self.factor:g} ({self.factor_source})"


def _get(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def _rope_parameters(config: Any) -> dict[str, Any] | None:
    has_pet = "position_embedding_type" in config if isinstance(config, dict) else hasattr(config, "position_embedding_type")
    if has_pet and _get(config, "position_embedding_type") != "rope":
        return None  # e.g. GraniteMoeHybrid: rope_parameters in the config, but no rotary embeddings used ("nope")
    params = _get(config, "rope_parameters") or _get(config, "rope_scaling")
    if isinstance(params, dict) and params and not any(isinstance(v, dict) for v in params.values()):
        return dict(params)
    if _get(config, "rope_theta") is not None:
        return {"rope_type": "default", "rope_theta": _get(config, "rope_theta")}
    if isinstance(params, dict) and params:
        raise BadInputError("per-layer-type RoPE parameters are not supported by --rope-scale")
    return None


def trained_context(config: Any, source_path: str | Path | None = None) -> tuple[int | None, str]:
    """The context the model was trained to where seqtool knows it: (tokens, where that came from) or (None, "")."""
    for step in reversed(recipe_mod.read(config)):
        if step.get("context"):
            return int(step["context"]), f"seqtool recipe step '{step.get('op')}'"
    if source_path is not None:
        from seqtool.zoo import presets

        if Path(source_path).resolve() == presets.REF_DIR.resolve():
            return presets.REF_TRAINED_CONTEXT, "ref model (trained to 2048 tokens)"
    return None, ""


def parse_rope_scale(text: str | None) -> tuple[str | None, float | None]:
    """``"linear:4"`` -> ("linear", 4.0); ``"yarn"`` -> ("yarn", None); None -> (None, None)."""
    if text is None or str(text).strip() == "":
        return None, None
    kind, _, factor = str(text).strip().partition(":")
    kind = kind.strip().lower()
    if kind not in ROPE_TYPES:
        raise BadInputError(f"unknown RoPE scaling '{kind}'; use one of {', '.join(ROPE_TYPES)} as TYPE:FACTOR, e.g. linear:4")
    if not factor:
        return kind, None
    try:
        value = float(factor)
    except ValueError:
        raise BadInputError(f"malformed RoPE factor '{factor}' in '{text}'; use e.g. linear:4") from None
    if not value >= 1.0:
        raise BadInputError(f"RoPE factor must be >= 1, got '{factor}'")
    return kind, value


def plan_context_extension(config: Any, context: str | int, rope_scale: str | None = None, *,
                           known_trained_context: tuple[int | None, str] | None = None) -> ContextPlan:
    """Decide the new ``max_position_embeddings`` and ``rope_parameters`` for ``context`` tokens (``"8k"``)."""
    ctx = parse_length(context)
    kind, factor = parse_rope_scale(rope_scale)
    params = _rope_parameters(config)
    if params is None:
        if kind is not None:
            raise BadInputError(f"--rope-scale needs a RoPE model; '{_get(config, 'model_type', '?')}' has no rotary embeddings")
        return ContextPlan(ctx, ctx, None, 1.0, None, "no RoPE", None)
    current = params.get("rope_type", params.get("type", "default"))
    if current != "default" and not (kind in (None, "linear") and current == "linear"):
        raise BadInputError(f"the model already uses RoPE '{current}'; seqtool only scales default (or linear) RoPE")
    trained, where = known_trained_context if known_trained_context is not None else trained_context(config)
    old_max = int(_get(config, "max_position_embeddings") or 0) or None
    base = trained or old_max
    if factor is not None:
        source = "given"
    elif base:
        factor = ctx / base
        source = f"{ctx} / trained context {trained} ({where})" if trained else f"{ctx} / max_position_embeddings {old_max}"
    else:
        raise BadInputError("the model's trained context is unknown and it has no max_position_embeddings; "
                            "pass --rope-scale TYPE:FACTOR")
    kind = kind or ("linear" if current == "linear" else DEFAULT_ROPE_TYPE)
    if factor <= 1.0 and source != "given":
        return ContextPlan(ctx, max(ctx, old_max or 0), None, factor, None, source, trained)
    original = int(base or ctx)
    new = {k: v for k, v in params.items() if k in ("rope_theta", "partial_rotary_factor")}
    prior = float(params.get("factor", 1.0)) if current == "linear" else 1.0
    new.update(rope_type=kind, factor=float(factor) * prior)
    max_pos = ctx
    if kind == "yarn":
        new["original_max_position_embeddings"] = original
    elif kind == "dynamic":
        max_pos = original
    return ContextPlan(ctx, max_pos, new, float(factor), kind, source, trained)


def check_context_extension(config: Any, plan: ContextPlan) -> Any:
    """A copy of ``config`` with ``plan`` written, checked to survive a plain transformers round trip (some classes,
    e.g. Phi3Config, accept only their own RoPE types); a one-line error otherwise."""
    candidate = copy.deepcopy(config)
    candidate.max_position_embeddings = plan.max_position_embeddings
    if plan.rope_parameters is None:
        return candidate
    candidate.rope_parameters = dict(plan.rope_parameters)
    if hasattr(candidate, "original_max_position_embeddings") and "original_max_position_embeddings" in plan.rope_parameters:
        candidate.original_max_position_embeddings = plan.rope_parameters["original_max_position_embeddings"]
    try:
        reloaded = type(candidate).from_dict(candidate.to_dict())
    except Exception as exc:  # noqa: BLE001 - transformers raises ValueError/KeyError for unsupported types
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.strip().endswith(":")]
        why = f": {lines[0][:200]}" if lines else ""
        raise BadInputError(f"transformers' {type(config).__name__} does not accept RoPE '{plan.rope_type}'{why}") from None
    got = reloaded.rope_parameters or {}
    if got.get("rope_type") != plan.rope_type or float(got.get("factor", 0)) != plan.rope_parameters["factor"]:
        raise BadInputError(f"transformers' {type(config).__name__} rewrites RoPE '{plan.rope_type}' as "
                            f"'{got.get('rope_type')}' on load; choose another --rope-scale type")
    return candidate


def apply_context_extension(model: Any, plan: ContextPlan) -> None:
    """Write ``plan`` into ``model.config`` (checked by :func:`check_context_extension`) and rebuild every rotary
    embedding module from the new config."""
    config = model.config
    candidate = check_context_extension(config, plan)
    config.max_position_embeddings = candidate.max_position_embeddings
    if plan.rope_parameters is not None:
        config.rope_parameters = candidate.rope_parameters
        if hasattr(config, "original_max_position_embeddings") and "original_max_position_embeddings" in plan.rope_parameters:
            config.original_max_position_embeddings = candidate.original_max_position_embeddings
    _rebuild_rotary(model)


def _rebuild_rotary(model: Any) -> None:
    """Re-create each rotary-embedding module (``inv_freq`` is computed in ``__init__`` from the config)."""
    for name, module in list(model.named_modules()):
        if not (hasattr(module, "inv_freq") and hasattr(module, "rope_type")):
            continue
        device = module.inv_freq.device
        fresh = type(module)(config=getattr(module, "config", model.config)).to(device)
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], fresh)


def recipe_fields(plan: ContextPlan) -> dict[str, Any]:
    """The keys a finetune step records so the next extension knows the trained context."""
    return {"context": plan.context, "rope_scale": (f"{plan.rope_type}:{plan.factor:g}" if plan.rope_type else None),
            "rope_factor_source": plan.factor_source}
