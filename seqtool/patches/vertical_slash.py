"""``vertical_slash``: MInference-style vertical columns + slash diagonals, estimated per head.

The last ``last_q`` queries of the call attend every causal key (a ``last_q x Tk`` score tensor per head, never
``Tq x Tk``); their softmax mass summed per key column gives vertical scores, summed per diagonal offset
(``query position - key position``) gives slash scores. Slash offsets are grouped into bands of ``block`` offsets
(a band covers exactly one key block per query block, as the kernel runs slashes block-wise) and the best bands
are kept; the best columns are kept as exact key columns. Band 0 (the local diagonal) and the first
``sink_tokens`` columns are always kept.

Blocks are ``block`` tokens (default: 64, or 128 for calls with at least 8192 keys, see ``block_for``).
Budget → units, with ``tokens = budget.tokens(Tk)``: ``ceil((1 - vertical_share) * tokens / block)`` slash bands
and ``ceil(vertical_share * tokens)`` vertical columns. Prefill only: decode steps attend every key
(``kernels.decode_attn``), as in MInference. Computed by ``kernels.block_sparse_attn`` with key columns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from seqtool.errors import BadInputError
from seqtool.patches import _ops as kernels
from seqtool.patches.base import AttentionMethod, AttnCall
from seqtool.patches.registry import register_method
from seqtool.patches.selection import ColumnBlockSelection, KeptSelection, Selection


LONG_CALL = 8192  # keys from which the default block size is 128


@register_method
@dataclass
class VerticalSlash(AttentionMethod):
    name: ClassVar[str] = "vertical_slash"
    budget_units: ClassVar[str] = "ceil((1-vertical_share)*tokens/block) slash bands + ceil(vertical_share*tokens) columns"

    budget: float | str | None = 0.25
    # None: 64-token blocks (MInference's), 128 from LONG_CALL keys on; 128 halves the CPU path's per-row gathers
    # and bookkeeping (16k, 90 % sparsity: 0.30x vs 0.36x SDPA in benchmarks/patches.py) while 64 spends small
    # budgets more finely on short inputs (2k on ref at budget 0.1: ppl 40.2 vs 45.3)
    block: int | None = None
    last_q: int = 64
    vertical_share: float = 0.5
    sink_tokens: int = 4

    def validate(self) -> None:
        if (self.block is not None and self.block < 1) or self.last_q < 1 or not 0 <= self.vertical_share <= 1 or self.sink_tokens < 0:
            raise BadInputError("vertical_slash needs block >= 1, last_q >= 1, 0 <= vertical_share <= 1, sink_tokens >= 0")

    def block_for(self, tk: int) -> int:
        """Block size of a call with ``tk`` keys (``block`` when set)."""
        return self.block or (128 if tk >= LONG_CALL else 64)

    def estimate(self, call: AttnCall) -> tuple[torch.Tensor, torch.Tensor]:
        """Vertical ``(B, Hq, Tk)`` and slash-offset ``(B, Hq, Tk)`` attention mass of the last queries."""
        b, hq = call.q.shape[:2]
        hkv, tk, g = call.k.shape[1], call.tk, call.n_rep
        n = min(self.last_q, call.tq)
        dev = call.q.device
        # GQA: the query heads of a KV group share one matmul against their KV head (k is never repeated)
        q_last = call.q[:, :, -n:].float().reshape(b, hkv, g * n, -1)
        # query i sits at tk - n + i: only the last n keys can lie after it
        future = torch.ones(n, n, dtype=torch.bool, device=dev).triu_(1).repeat(g, 1)
        vertical = torch.empty(b, hkv, g, tk, device=dev)
        slash = torch.empty(b, hkv, g, tk, device=dev)
        # Slash mass per offset o = pos_i - key, without an index tensor: rows padded by n zeros on both sides,
        # row i read shifted left by i (stride row + 1): column j then holds key j + i - n, i.e. offset tk - j.
        row = tk + 2 * n
        padded = torch.zeros(g, n, row, device=dev)
        skew = padded.as_strided((g, n, tk + 1), (n * row, row + 1, 1))
        for bi in range(b):  # one KV head at a time keeps the temporaries at (g * n, tk)
            for h in range(hkv):
                s = (q_last[bi, h] @ call.k[bi, h].float().T).mul_(call.scale)
                s[:, tk - n:].masked_fill_(future, float("-inf"))
                s.sub_(s.amax(-1, keepdim=True)).exp_()
                probs = s.div_(s.sum(-1, keepdim=True)).view(g, n, tk)
                vertical[bi, h] = probs.sum(1)
                padded[:, :, n:n + tk] = probs
                slash[bi, h] = skew.sum(1)[:, 1:].flip(-1)  # offsets 0 .. tk-1
        return vertical.view(b, hq, tk), slash.view(b, hq, tk)

    def select(self, call: AttnCall) -> Selection:
        bs = self.block_for(call.tk)
        b, hq = call.q.shape[:2]
        vertical, slash = self.estimate(call)
        tokens = self.budget_rule.tokens(call.tk)
        n_bands_all = -(-call.tk // bs)
        if tokens >= call.tk:  # full (or a budget above the keys): every diagonal band covers every causal key
            n_bands, n_cols = n_bands_all, 0
        else:
            n_bands = min(n_bands_all, max(1, math.ceil((1 - self.vertical_share) * tokens / bs)))
            n_cols = min(call.tk, math.ceil(self.vertical_share * tokens))
        band = torch.nn.functional.pad(slash, (0, n_bands_all * bs - call.tk)).view(b, hq, n_bands_all, bs).sum(-1)
        band[..., 0] = float("inf")
        slash_index = band.topk(n_bands, -1).indices * bs
        vertical[..., : self.sink_tokens] = float("inf")
        vertical_index = vertical.topk(n_cols, -1).indices if n_cols else vertical.new_zeros(b, hq, 1, dtype=torch.long)
        vcount = torch.full((b, hq), n_cols, dtype=torch.int32, device=call.q.device)
        bi, bc, ci, cc = kernels.vertical_slash_index(vertical_index, slash_index, call.tq, call.tk, block_q=bs,
                                                      block_k=bs, vertical_count=vcount)
        return ColumnBlockSelection(bi, bc, bs, bs, call.tq, call.tk, column_index=ci, column_count=cc)

    def select_decode(self, call: AttnCall) -> Selection:
        return KeptSelection(call.q.shape[0], call.q.shape[1], call.tq, call.tk, call.q.device)
