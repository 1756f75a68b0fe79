"""Composable, weighted training objectives.

Each objective returns a loss already normalised by the step's global token count (``ctx.token_scale``), so the
sum over micro-batches, grad-accumulation steps and processes is the mean over every target token of the
optimizer step: one process with batch B and N processes with B/N rows each compute the same gradient.

- :class:`LMLoss` — next-token cross-entropy on the labels (``-100`` = no loss).
- :class:`KLDistill` — KL(teacher ‖ student) of the next-token distributions at temperature T (× T²), optionally
  over the teacher's top-k tokens only (the teacher's top-k probabilities renormalised).
- :class:`ModuleMatch` — MSE between a student module's output and the teacher's module of the same name on the
  same input (attention transfer), captured with forward hooks; mean over the hidden size, summed over target
  positions.
- :class:`AnswerLoss` — cross-entropy on the answer tokens of retrieval rows only (the batch's ``answer_mask``),
  the mean over those tokens per micro-batch: a few answer tokens would otherwise drown among thousands of text
  tokens (what taught ``ref`` to copy). Zero for batches without answers.
- :class:`AuxLoss` — auxiliary terms: ``fn(ctx) -> scalar`` and/or terms that modules report during the
  student's forward with :func:`emit_aux_loss` (router load balancing). Scalars are averaged per micro-batch.

A new objective subclasses :class:`Objective` and implements ``__call__(ctx) -> scalar tensor``; set
``needs_teacher`` when it reads ``ctx.teacher_logits`` / teacher captures. ``attach``/``detach`` install hooks.
Extra numbers to log go in ``self.metrics`` (a dict of floats, set in ``__call__``; logged under their own keys).
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqtool.errors import BadInputError

_AUX_SINK: contextvars.ContextVar[list | None] = contextvars.ContextVar("seqtool_aux_sink", default=None)


def emit_aux_loss(name: str, value: torch.Tensor) -> None:
    """Called from a module's forward (e.g. a router): report an auxiliary loss term for this micro-batch.

    Outside a training step (no sink installed) this does nothing, so modules may call it unconditionally."""
    sink = _AUX_SINK.get()
    if sink is not None:
        sink.append((name, value))


@dataclass
class StepContext:
    """What an objective sees for one micro-batch.

    ``input_ids``/``labels`` (B, L); ``logits`` (B, L, V) of the student; ``teacher_logits`` (B, Lt, V) or None
    (Lt <= L: a teacher that saw only the row's first Lt tokens, see :func:`teacher_span`);
    ``target_mask`` (B, L-1) bool: position t has a next-token target; ``token_scale``: world / (target tokens
    in the whole optimizer step, all processes); ``micro_scale``: 1 / micro-batches per step."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor
    target_mask: torch.Tensor
    token_scale: float
    micro_scale: float
    teacher_logits: torch.Tensor | None = None
    aux_terms: list = field(default_factory=list)
    outputs: Any = None
    batch: dict = field(default_factory=dict)  # this process's micro-batch, extra tensors of the source included


class Objective:
    """Base class: ``weight`` × ``__call__(ctx)`` is added to the loss and logged as ``loss_<name>``."""

    name: str = "objective"
    needs_teacher: bool = False

    def __init__(self, weight: float = 1.0):
        self.weight = float(weight)

    def attach(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Install hooks (called once before training)."""

    def detach(self) -> None:
        """Remove hooks."""

    def describe(self) -> dict:
        return {"name": self.name, "weight": self.weight}

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError


def teacher_span(ctx: StepContext, teacher_len: int) -> int:
    """How many leading positions (of the L-1 that have a next-token target) student and teacher share."""
    return min(int(teacher_len), ctx.logits.shape[1] - 1)


class LMLoss(Objective):
    """Causal-LM cross-entropy (sum over target tokens × ``ctx.token_scale``)."""

    name = "lm"

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        # Shift the labels, not the logits: slicing (B, L, V) logits would copy them.
        labels = F.pad(ctx.labels[:, 1:], (0, 1), value=-100)
        logits = ctx.logits.float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                              reduction="sum")
        return nll * ctx.token_scale


class KLDistill(Objective):
    """KL(teacher ‖ student) per target token at ``temperature`` (× T², Hinton et al.); ``top_k``: only the
    teacher's k most likely tokens (renormalised), which is what a stored/streamed teacher keeps."""

    name = "kl"
    needs_teacher = True

    def __init__(self, weight: float = 1.0, temperature: float = 1.0, top_k: int | None = None):
        super().__init__(weight)
        if temperature <= 0:
            raise BadInputError(f"KL temperature must be > 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise BadInputError(f"KL top-k must be >= 1, got {top_k}")
        self.temperature, self.top_k = float(temperature), top_k

    def describe(self) -> dict:
        return {**super().describe(), "temperature": self.temperature, "top_k": self.top_k}

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        if ctx.teacher_logits is None:
            raise BadInputError("the kl objective needs a teacher (--teacher)")
        n = teacher_span(ctx, ctx.teacher_logits.shape[1])                  # a shorter teacher: its positions only
        mask = ctx.target_mask[:, :n]
        s = ctx.logits[:, :n][mask].float() / self.temperature             # (T, V)
        t = ctx.teacher_logits[:, :n][mask].float() / self.temperature     # (T, V)
        log_q = F.log_softmax(s, dim=-1)
        if self.top_k is not None and self.top_k < t.shape[-1]:
            top, idx = t.topk(self.top_k, dim=-1)
            log_p = F.log_softmax(top, dim=-1)
            kl = (log_p.exp() * (log_p - log_q.gather(-1, idx))).sum(-1)
        else:
            log_p = F.log_softmax(t, dim=-1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        return kl.sum() * (self.temperature ** 2) * ctx.token_scale


class AnswerLoss(Objective):
    """Mean cross-entropy over the answer tokens (``ctx.batch["answer_mask"]`` (B, L) bool: the token at t is an
    answer token, predicted at t-1) of the micro-batch, × ``ctx.micro_scale``. No answer tokens: 0.
    ``teacher=True`` (objective ``answer_kl``): the mean KL(teacher ‖ student) over those positions instead, so
    answers the teacher itself cannot give (variable tracking on a small model) are soft targets, not labels."""

    name = "answer"

    def __init__(self, weight: float = 1.0, teacher: bool = False):
        super().__init__(weight)
        self.teacher = teacher
        self.needs_teacher = teacher
        self.name = "answer_kl" if teacher else "answer"

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        mask = ctx.batch.get("answer_mask")
        if mask is None or not bool(mask[:, 1:].any()):
            return (ctx.logits.sum() * 0.0).float()                    # keeps the graph when it is the only term
        mask = mask[:, 1:].to(ctx.logits.device)                       # (B, L-1): position t predicts an answer
        n = int(mask.sum())
        pred = ctx.logits[:, :-1][mask].float()                        # (n, V)
        if self.teacher:
            if ctx.teacher_logits is None:
                raise BadInputError("the answer_kl objective needs a teacher (--teacher)")
            span = teacher_span(ctx, ctx.teacher_logits.shape[1])
            mask, pred = mask[:, :span], ctx.logits[:, :span][mask[:, :span]].float()
            if not bool(mask.any()):                                   # every answer lies beyond the teacher
                return (ctx.logits.sum() * 0.0).float()
            n = int(mask.sum())
            log_p = F.log_softmax(ctx.teacher_logits[:, :span][mask].float(), dim=-1)
            kl = (log_p.exp() * (log_p - F.log_softmax(pred, dim=-1))).sum()
            return kl / n * ctx.micro_scale
        target = ctx.input_ids[:, 1:][mask]                            # (n,)
        return F.cross_entropy(pred, target, reduction="sum") / n * ctx.micro_scale


def _first_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class ModuleMatch(Objective):
    """MSE between student and teacher outputs of the modules named ``modules`` (qualified names, resolved on
    both models; e.g. every layer's ``self_attn``). Mean over the hidden size, summed over target positions."""

    name = "match"
    needs_teacher = True

    def __init__(self, modules: list[str], weight: float = 1.0):
        super().__init__(weight)
        if not modules:
            raise BadInputError("module matching needs at least one module")
        self.modules = list(modules)
        self._handles: list = []
        self.student_out: dict[str, torch.Tensor] = {}
        self.teacher_out: dict[str, torch.Tensor] = {}

    def describe(self) -> dict:
        return {**super().describe(), "modules": len(self.modules)}

    def attach(self, student: nn.Module, teacher: nn.Module | None) -> None:
        if teacher is None:
            raise BadInputError("the match objective needs a teacher (--teacher)")
        self.detach()
        for store, model in ((self.student_out, student), (self.teacher_out, teacher)):
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            for name in self.modules:
                try:
                    module = base.get_submodule(name)
                except AttributeError:
                    raise BadInputError(f"module '{name}' is not in both student and teacher") from None

                def hook(_m, _inp, out, name=name, store=store):
                    store[name] = _first_tensor(out)

                self._handles.append(module.register_forward_hook(hook))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        mask = ctx.target_mask
        total = ctx.logits.new_zeros((), dtype=torch.float32)
        for name in self.modules:
            s, t = self.student_out.pop(name, None), self.teacher_out.pop(name, None)
            if s is None or t is None:
                raise RuntimeError(f"module '{name}' did not run in the student and the teacher")
            n = teacher_span(ctx, t.shape[1])
            err = (s[:, :n].float() - t[:, :n].float().detach()).pow(2).mean(-1)   # (B, n)
            total = total + err[mask[:, :n]].sum()
        return total / len(self.modules) * ctx.token_scale


class AuxLoss(Objective):
    """Auxiliary terms: ``fn(ctx) -> scalar`` and every :func:`emit_aux_loss` term whose name is in ``names``
    (all of them if ``names`` is None). Each micro-batch's scalar is averaged over the step (``micro_scale``)."""

    name = "aux"

    def __init__(self, weight: float = 1.0, fn: Callable[[StepContext], torch.Tensor] | None = None,
                 names: list[str] | None = None, name: str = "aux"):
        super().__init__(weight)
        self.fn, self.names, self.name = fn, names, name

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        total = ctx.logits.new_zeros((), dtype=torch.float32)
        if self.fn is not None:
            total = total + self.fn(ctx)
        for name, value in ctx.aux_terms:
            if self.names is None or name in self.names:
                total = total + value.float()
        return total * ctx.micro_scale


def teacher_needed(objectives: list[Objective]) -> bool:
    return any(o.needs_teacher for o in objectives)


def parse_loss_weights(spec: str) -> dict[str, float]:
    """``"lm=1,kl=0.5"`` → {"lm": 1.0, "kl": 0.5} (a bare name means weight 1)."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, _, w = part.partition("=")
        try:
            out[name.strip()] = float(w) if w else 1.0
        except ValueError:
            raise BadInputError(f"bad loss weight '{part}'; write e.g. lm=1,kl=0.5") from None
    known = {"lm", "kl", "match", "answer", "answer_kl", "balance", "zloss"}  # balance / zloss: router losses (seqtool.train.routers)
    bad = sorted(set(out) - known)
    if bad or not out:
        raise BadInputError(f"unknown objective {', '.join(bad) or '(none)'}; choose from {', '.join(sorted(known))}")
    return out
