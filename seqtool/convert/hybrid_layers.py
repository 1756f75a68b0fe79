"""Which layers stay softmax attention in ``convert --to hybrid``.

Three ways, in order of precedence: an explicit list (``attention_layers``), a fraction of the layers
(``keep_attention``) ranked by retrieval score, or (default) the :data:`DEFAULT_KEEP` fraction ranked the same way.
A layer's retrieval score is its best head's attention mass on the needle while the model answers calibration
passkey prompts (:func:`needle_scores`; needs the tokenizer). Without a tokenizer it is the induction score of
the copy probe of :mod:`seqtool.arch.probe` (the scores RazorAttention uses for its retrieval heads: attention
that second-copy queries give to the token after the earlier occurrence of their token). The copy probe is
uninformative on models whose retrieval was trained on tasks rather than random-token copying (``ref`` scores
about 0.01 everywhere), hence the calibration prompts. Layers that look things up far back are the ones a
fixed-size recurrent state serves worst.
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


def needle_scores(model: nn.Module, tokenizer, *, samples: int = 8, seq_len: int = 512, seed: int = 0) -> list[float]:
    """Per layer: the best query head's attention mass on the needle while the model reads out the answer.

    Calibration prompts are passkey prompts (train key space, filler from the built-in calibration text) followed
    by their answer; for every answer position we take the attention each head gives to the needle sentence's
    tokens, averaged over positions and prompts. Eager attention, one prompt at a time: (H, T, T) per layer."""
    import numpy as np
    import torch

    from seqtool.arch.probe import attention_maps
    from seqtool.convert.calib import builtin_text
    from seqtool.eval.tasks import PASSKEY_NEEDLE, make_sample

    filler = np.asarray(tokenizer(builtin_text(seq_len * 16), add_special_tokens=False)["input_ids"])
    needle_len = len(tokenizer.encode(PASSKEY_NEEDLE.format(key="12345"), add_special_tokens=False))
    rng = np.random.default_rng([seed, 4242])
    totals = None
    for j in range(samples):
        s = make_sample("passkey", tokenizer, filler, seq_len, (j + 0.5) / samples, rng, split="train",
                        check_unique=False)
        ids = torch.tensor([s.input_ids + s.answer_ids])
        first_q = len(s.input_ids) - 1  # the position that predicts the first answer token
        queries = torch.arange(first_q, ids.shape[1] - 1)
        span = slice(s.needle_pos, s.needle_pos + needle_len)
        maps = attention_maps(model, ids)  # per layer (1, H, T, T)
        mass = torch.stack([a[0][:, queries, span].sum(-1).mean(-1) for a in maps])  # (L, H)
        totals = mass if totals is None else totals + mass
    return (totals / samples).amax(-1).tolist()


def count_for_fraction(fraction: float, n_layers: int) -> int:
    """Layers kept for ``fraction`` of ``n_layers`` (rounded up, so any positive fraction keeps one)."""
    return min(n_layers, math.ceil(fraction * n_layers - 1e-9))


def choose_layers(model: nn.Module, n_layers: int, *, attention_layers: list[int] | None,
                  keep_attention: float | None, tokenizer=None, seed: int = 0) -> LayerChoice:
    """The layers to keep as attention (validated by the caller's ``check``). With a tokenizer the score is
    :func:`needle_scores` (calibration passkey prompts), without one :func:`retrieval_scores` (copy probe)."""
    if attention_layers is not None:
        return LayerChoice(list(attention_layers), "listed with --attention-layers")
    fraction = DEFAULT_KEEP if keep_attention is None else keep_attention
    n_keep = count_for_fraction(fraction, n_layers)
    if tokenizer is not None:
        scores = needle_scores(model, tokenizer, seed=seed)
        how = "attention on the needle while answering calibration passkey prompts"
    else:
        scores = retrieval_scores(model, seed=seed)
        how = "induction scores on the copy probe"
    ranked = sorted(range(n_layers), key=lambda i: (-scores[i], i))
    kept = sorted(ranked[:n_keep])
    source = "default" if keep_attention is None else "--keep-attention"
    reason = f"{source} {fraction:g} of {n_layers} layers = {n_keep} with the highest retrieval scores ({how})"
    return LayerChoice(kept, reason, [round(s, 4) for s in scores])
