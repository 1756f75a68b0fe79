"""Long-context fine-tuning (LongLoRA / SinkLoRA) on the engine: ``finetune --method sinklora|s2attn --context 8k``.

:func:`prepare_long_context` decides (new context, RoPE scaling, group size, sinks) before anything is loaded
into the trainer; :func:`LongContextSetup.apply` writes the context extension into the model (config + rotary
embeddings, kept in the saved checkpoint) and turns on the grouped training attention, whose handle the caller
removes after training: the saved model uses full attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seqtool.arch.rope_scaling import (ContextPlan, apply_context_extension, check_context_extension,
                                       plan_context_extension, recipe_fields, trained_context)
from seqtool.errors import BadInputError
from seqtool.train.shifted_attention import (DEFAULT_SINKS, METHODS, ShiftedAttentionHandle, apply_shifted_attention,
                                             resolve_group_size)

#: ``--method`` values that train LoRA with a grouped training attention.
LONG_METHODS = METHODS
#: LongLoRA trains the attention projections (LoRA) plus embeddings and norms.
LONG_TRAIN_KINDS = "attention,embed,norm"
#: Defaults of a ``--context`` run where the user sets nothing (the recipe behind docs/long_context.md's numbers):
#: 60 steps of one row of ``context`` tokens, 50 % synthetic retrieval rows (passkey, NIAH, ...) among the built-in
#: text; objectives LM + answer-token CE + KL and attention-output matching to the model before the extension (the
#: teacher, on the positions it was trained for); LoRA rank 8 at lr 2e-4 (a low rate: more moves the model off its
#: full-attention behaviour faster than it learns the new positions). ``short_frac`` > 0 (``--short-frac``) puts
#: that share of the steps on ``short_batch`` rows of ``short_seq_len`` tokens first (measured worse at 8k).
LONG_RECIPE: dict[str, Any] = {"steps": 60, "batch": 1, "train": LONG_TRAIN_KINDS, "mix_retrieval": 0.5,
                               "eval_rows": 8, "lr": 2e-4, "loss": "lm=1,answer=1,kl=1,match=1",
                               "short_frac": 0.0, "short_seq_len": 512, "short_batch": 4}


@dataclass
class LongContextSetup:
    """What a long-context fine-tune does: ``attention`` None = full attention (plain LoRA at the new context)."""

    plan: ContextPlan
    attention: str | None
    group_size: int | None
    sinks: int

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "attention": self.attention, "group_size": self.group_size,
                "sinks": self.sinks}

    def describe(self) -> str:
        attn = "full attention" if self.attention is None else (
            f"{self.attention}, groups of {self.group_size}" + (f", {self.sinks} sinks" if self.sinks else ""))
        return f"{self.plan.describe()}; training attention: {attn}"

    def recipe_fields(self) -> dict[str, Any]:
        return {**recipe_fields(self.plan), "attention": self.attention or "full", "group_size": self.group_size,
                "sinks": self.sinks if self.attention == "sinklora" else None}

    def teacher_context(self) -> int:
        """Tokens the original model is valid for (its trained context; else the new context / the factor)."""
        return int(self.plan.trained_context or round(self.plan.context / max(self.plan.factor, 1.0)))

    def phases(self, steps: int, batch: int, short_frac: float, short_batch: int,
               short_len: int | None = None) -> list[tuple[int, int, int]]:
        """The length schedule ``[(steps, row length, rows per step), ...]``: the first ``short_frac`` of the steps
        on ``short_batch`` rows of ``short_len`` tokens (default and at most: the original context), the rest on
        rows of the new context."""
        if not 0.0 <= short_frac < 1.0:
            raise BadInputError(f"short_frac must be in [0, 1), got {short_frac}")
        short_len = min(short_len or self.teacher_context(), self.teacher_context())
        n_short = min(int(round(steps * short_frac)), steps - 1)  # at least one step at the new context
        if n_short == 0 or short_len >= self.plan.context:
            return [(steps, self.plan.context, batch)]
        return [(n_short, short_len, short_batch), (steps - n_short, self.plan.context, batch)]

    def apply(self, model: Any) -> ShiftedAttentionHandle | None:
        """Extend ``model``'s context (config + rotary embeddings) and return the training-attention handle."""
        apply_context_extension(model, self.plan)
        if self.attention is None:
            return None
        return apply_shifted_attention(model, self.attention, group_size=self.group_size, sinks=self.sinks)


def prepare_long_context(config: Any, *, attention: str | None, context: str | int, rope_scale: str | None = None,
                         group_size: str | int | None = None, sinks: int | None = None,
                         source_path: str | Path | None = None) -> LongContextSetup:
    """Check and resolve the long-context options against ``config`` (nothing is changed yet)."""
    if attention is not None and attention not in LONG_METHODS:
        raise BadInputError(f"unknown long-context attention '{attention}'; choose one of {', '.join(LONG_METHODS)}")
    plan = plan_context_extension(config, context, rope_scale,
                                  known_trained_context=trained_context(config, source_path))
    check_context_extension(config, plan)
    if attention is None:
        if group_size is not None or sinks is not None:
            raise BadInputError("--group-size / --sinks need --method sinklora or s2attn")
        return LongContextSetup(plan, None, None, 0)
    if sinks is not None and attention != "sinklora":
        raise BadInputError("--sinks needs --method sinklora (s2attn has no sink tokens)")
    n_sinks = (DEFAULT_SINKS if sinks is None else int(sinks)) if attention == "sinklora" else 0
    if n_sinks < 0:
        raise BadInputError(f"--sinks must be >= 0, got {sinks}")
    return LongContextSetup(plan, attention, resolve_group_size(plan.context, group_size), n_sinks)
