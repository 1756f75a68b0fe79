"""The one budget rule shared by every patch method.

``budget`` is the number of causal key positions computed per query: a ratio in (0, 1] of that query's causal
context (``1`` = every key, like ``"full"``; ``"50%"`` is accepted), or a whole number ``>= 2`` of keys (sinks and
local window included); ``"full"`` keeps every causal key (the sparse path still runs: used to check it against
dense). Anything else (``1.5``, ``0``, ``2.5``, an empty value) is a one-line error. Each method maps the resolved token count onto its own units
(blocks, pages, columns + diagonals, top-K tokens) and documents how.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from seqtool.errors import BadInputError

FULL = "full"


@dataclass(frozen=True)
class Budget:
    """A parsed budget. ``value`` is a ratio (< 1), a token count (>= 1) or None for ``full``."""

    value: float | None

    @classmethod
    def parse(cls, raw: float | int | str | None) -> "Budget":
        if raw is None or (isinstance(raw, str) and raw.strip().lower() == FULL):
            return cls(None)
        text = raw.strip() if isinstance(raw, str) else raw
        try:
            value = float(text[:-1]) / 100 if isinstance(text, str) and text.endswith("%") else float(text)
        except (TypeError, ValueError):
            value = float("nan")
        if math.isfinite(value) and 0 < value < 1:
            return cls(value)
        if value == 1:
            return cls(None)  # ratio 1: every key
        if math.isfinite(value) and value >= 2 and value == int(value) and not (isinstance(text, str)
                                                                                 and text.endswith("%")):
            return cls(float(int(value)))
        raise BadInputError(f"budget must be a ratio in (0, 1] (1 = full; 50% also accepted), a whole number of "
                            f"keys >= 2, or 'full'; got {raw!r}")

    @property
    def is_full(self) -> bool:
        return self.value is None

    def tokens(self, context: int) -> int:
        """Key positions to keep for a query that sees ``context`` causal keys (1 <= result <= context)."""
        if context <= 0:
            return 0
        if self.value is None:
            return context
        kept = math.ceil(self.value * context) if self.value < 1 else int(self.value)
        return max(1, min(context, kept))

    def __str__(self) -> str:
        if self.value is None:
            return FULL
        return f"{self.value:g}"
