"""The base class every patch method derives from, and the per-call view a method sees.

A method is a dataclass (its fields are its options, parsed by :mod:`seqtool.patches.spec`) with one main override
point, :meth:`AttentionMethod.select`, returning a :class:`~seqtool.patches.selection.Selection`; the selection's
``attend`` runs the sparse compute through ``seqtool.kernels``. Methods that keep state across decode steps or evict
KV also override :meth:`AttentionMethod.make_cache_layer` (see :mod:`seqtool.patches.cache`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from seqtool.errors import BadInputError
from seqtool.patches.budget import Budget
from seqtool.patches.selection import DenseSelection, Selection

if TYPE_CHECKING:
    from seqtool.patches.cache import SeqtoolCacheLayer

#: A call with at most this many queries and a non-empty past is a decode step (``kernels.decode_attn`` range).
DECODE_MAX_Q = 16


@dataclass
class AttnCall:
    """One attention call on a group of batch rows that share the same left padding, already unpadded.

    ``q``: ``(b, Hq, Tq, D)``; ``k``/``v``: ``(b, Hkv, Tk, D)`` holding only valid keys, queries aligned to the end
    (query ``i`` sits at key position ``Tk - Tq + i``). ``rows``: indices of these rows in the full batch (index
    per-row state with them). ``key_offset``: index in the cache tensors of this group's key 0. ``cache``: the
    seqtool cache layer of this layer when the model runs with :func:`seqtool.patches.make_cache`, else None.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    layer_idx: int
    rows: torch.Tensor
    key_offset: int
    cache: "SeqtoolCacheLayer | None" = None

    @property
    def tq(self) -> int:
        return self.q.shape[2]

    @property
    def tk(self) -> int:
        return self.k.shape[2]

    @property
    def n_rep(self) -> int:
        return self.q.shape[1] // self.k.shape[1]

    @property
    def is_decode(self) -> bool:
        return self.tq <= DECODE_MAX_Q and self.tk > self.tq

    def context(self, i: int | torch.Tensor) -> int | torch.Tensor:
        """Causal keys seen by query ``i``."""
        return self.tk - self.tq + i + 1


@dataclass
class AttentionMethod:
    """Base patch method. Subclasses set ``name`` and override :meth:`select` (and optionally the rest).

    Shared options: ``budget`` (see :mod:`seqtool.patches.budget`), ``min_len`` (calls whose longest causal context
    is below it run dense), ``mass`` (attention-mass threshold, only where ``supports_mass``).
    """

    name: ClassVar[str] = ""
    #: False for methods that take no budget (``dense``, ``act``).
    takes_budget: ClassVar[bool] = True
    supports_mass: ClassVar[bool] = False
    #: One line for ``seqtool patch --help`` and docs: how the budget maps onto the method's own units.
    budget_units: ClassVar[str] = ""

    budget: float | str | None = 0.25
    min_len: int = 0
    mass: float | None = None

    def __post_init__(self) -> None:
        self.budget_rule = Budget.parse(self.budget) if self.takes_budget else Budget(None)
        if self.min_len < 0:
            raise BadInputError(f"min_len must be >= 0, got {self.min_len}")
        if self.mass is not None:
            if not self.supports_mass:
                raise BadInputError(f"method '{self.name}' has no mass= option; use budget=")
            if not 0 < self.mass <= 1:
                raise BadInputError(f"mass must be in (0, 1], got {self.mass}")
        self.validate()

    # ---- override points -------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check method-specific options; raise BadInputError with a one-line fix."""

    def select(self, call: AttnCall) -> Selection:
        """What to compute for ``call`` (prefill, chunked prefill and, unless overridden, decode)."""
        raise NotImplementedError

    def select_decode(self, call: AttnCall) -> Selection:
        """What to compute for a decode step (``call.is_decode``); defaults to :meth:`select`."""
        return self.select(call)

    def make_cache_layer(self, runtime: Any) -> "SeqtoolCacheLayer | None":
        """A cache layer owning this method's per-layer state or eviction; None keeps a plain DynamicLayer."""
        return None

    # ---- framework helpers -----------------------------------------------------------------------------------
    def runs_dense(self, call: AttnCall) -> bool:
        return call.tk < self.min_len

    def dense_selection(self, call: AttnCall) -> Selection:
        return DenseSelection(call.q.shape[0], call.q.shape[1], call.tq, call.tk, call.q.device)

    def options(self) -> dict[str, Any]:
        """Every option value (None omitted): what a recipe stores, so a later change of defaults cannot change
        a saved checkpoint's behaviour."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.init and value is not None and not (f.name == "budget" and not self.takes_budget):
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out
