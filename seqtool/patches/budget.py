"""The one budget rule shared by every patch method.

``budget`` is the number of causal key positions computed per query: a ratio of that query's causal context when
``< 1``, a token count when ``>= 1`` (sinks and local window included), ``"full"`` for every causal key (the sparse
path still runs: used to check it against dense). Each method maps the resolved token count onto its own units
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
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise BadInputError(f"budget must be a ratio < 1, a token count >= 1 or 'full', got {raw!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise BadInputError(f"budget must be > 0, got {raw!r}")
        return cls(value)

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
