"""Which layers stay softmax attention in ``convert --to hybrid``.

Three ways, in order of precedence: an explicit list (``attention_layers``), a fraction of the layers
(``keep_attention``) ranked by retrieval score, or (default) the :data:`DEFAULT_KEEP` fraction ranked the same way.
A layer's retrieval score is the induction score of its best query head on the copy probe of
:mod:`seqtool.arch.probe` (the same scores RazorAttention uses for its retrieval heads): the attention that
second-copy queries give to the token after the earlier occurrence of their token, i.e. long-range lookup.
Layers that look things up far back are the ones a fixed-size recurrent state serves worst.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn as nn

from seqtool.errors import BadInputError

DEFAULT_KEEP = 0.25


@dataclass
class LayerChoice:
    """The attention layers kept, why, and every layer's retrieval score (None when not measured)."""

    attention_layers: list[int]
    reason: str
    scores: list[float] | None = None

    def describe(self) -> list[str]:
        """One line per layer: kind, score, and the rule that chose it."""
        lines = []
        n = len(self.scores) if self.scores is not None else None
        for i in range(n if n is not None else 0):
            kind = "attention" if i in self.attention_layers else "converted"
            lines.append(f"layer {i}: retrieval score {self.scores[i]:.3f} -> {kind}")
        lines.append(f"kept attention layers {self.attention_layers} ({self.reason})")
        return lines


def parse_layers(value: str | list[int] | tuple[int, ...] | None) -> list[int] | None:
    """``"0,3"`` or ``[0, 3]`` → sorted unique ints; None stays None. Malformed text is a one-line error."""
    if value is None:
        return None
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
        try:
            value = [int(v) for v in items]
        except ValueError:
            raise BadInputError(f"--attention-layers takes comma-separated layer indices like 0,3, got {value!r}") from None
    return sorted({int(v) for v in value})


def retrieval_scores(model: nn.Module, *, length: int = 64, batch: int = 4, seed: int = 0) -> list[float]:
    """Per layer: the best query head's induction score on the copy probe (n_layers floats in [0, 1])."""
    from seqtool.arch.probe import induction_scores

    return induction_scores(model, length=length, batch=batch, seed=seed).amax(-1).tolist()


def count_for_fraction(fraction: float, n_layers: int) -> int:
    """Layers kept for ``fraction`` of ``n_layers`` (rounded up, so any positive fraction keeps one)."""
    return min(n_layers, math.ceil(fraction * n_layers - 1e-9))


def choose_layers(model: nn.Module, n_layers: int, *, attention_layers: list[int] | None,
                  keep_attention: float | None, seed: int = 0) -> LayerChoice:
    """The layers to keep as attention (validated by the caller's ``check``)."""
    if attention_layers is not None:
        return LayerChoice(list(attention_layers), "listed with --attention-layers")
    fraction = DEFAULT_KEEP if keep_attention is None else keep_attention
    n_keep = count_for_fraction(fraction, n_layers)
    scores = retrieval_scores(model, seed=seed)
    ranked = sorted(range(n_layers), key=lambda i: (-scores[i], i))
    kept = sorted(ranked[:n_keep])
    source = "default" if keep_attention is None else "--keep-attention"
    reason = (f"{source} {fraction:g} of {n_layers} layers = {n_keep}, highest retrieval (induction) scores on the "
              f"copy probe")
    return LayerChoice(kept, reason, [round(s, 4) for s in scores])
