"""``dense``: full causal attention (torch SDPA) through the patch machinery — the reference every method is
checked against, and what ``dense_layers`` run. Takes no budget."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from seqtool.patches.base import AttentionMethod, AttnCall
from seqtool.patches.registry import register_method
from seqtool.patches.selection import Selection


@register_method
@dataclass
class Dense(AttentionMethod):
    name: ClassVar[str] = "dense"
    takes_budget: ClassVar[bool] = False
    budget_units: ClassVar[str] = "no budget: every causal key"

    budget: float | str | None = None

    def select(self, call: AttnCall) -> Selection:
        return self.dense_selection(call)
