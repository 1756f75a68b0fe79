"""``block_topk``: block-sparse prefill from block-mean scores, Quest-style page selection in decode.

Prefill / chunked prefill: queries and keys are cut into blocks of ``block`` tokens; the score of (query block,
key block) is the dot product of their mean query and mean key (per query head; GQA reads the shared KV head).
Each query block keeps the sink block 0, its diagonal block(s), and the best-scoring causal blocks up to
``ceil(budget.tokens(context) / block)`` blocks, ``context`` being the causal length of its last query. With
``mass=p`` it instead keeps the smallest set of blocks holding ``p`` of the softmax over block scores (plus the
forced ones). Computed by ``kernels.block_sparse_attn``.

Decode (Quest): keys are cut into pages of ``page`` tokens with per-channel min/max; a page's score is the upper
bound ``sum_d max(q_d * min_d, q_d * max_d)``, maximised over the query heads of a KV group (pages are chosen per KV
head, so GQA heads share them). The first and the current page are always kept; the budget maps to
``ceil(budget.tokens(Tk) / page)`` pages. Computed by ``kernels.decode_attn``. Page bounds of completed pages
are kept in the cache layer (``make_cache``); without it they are recomputed each step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from seqtool.errors import BadInputError
from seqtool.patches.base import AttentionMethod, AttnCall
from seqtool.patches.cache import SeqtoolCacheLayer
from seqtool.patches.registry import register_method
from seqtool.patches.selection import BlockSelection, PageSelection

NEG = float("-inf")


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """``(B, H, T, D)`` → ``(B, H, ceil(T/block), D)`` mean per block (the last block over its real tokens)."""
    b, h, t, d = x.shape
    n = -(-t // block)
    pad = n * block - t
    xf = x.float()
    # unflatten is a view even for a transposed (B, T, H, D)-strided q: no padded copy of q when T % block == 0
    sums = (xf if not pad else torch.nn.functional.pad(xf, (0, 0, 0, pad))).unflatten(2, (n, block)).sum(3)
    sizes = torch.full((n,), float(block), device=x.device)
    sizes[-1] = block - pad
    return sums / sizes[:, None]


def page_bounds(k: torch.Tensor, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-page channel min and max of keys ``(B, H, T, D)`` → two ``(B, H, ceil(T/page), D)``."""
    b, h, t, d = k.shape
    n = -(-t // page)
    pad = n * page - t
    kf = k.float()
    mn = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=float("inf")).view(b, h, n, page, d).amin(3)
    mx = torch.nn.functional.pad(kf, (0, 0, 0, pad), value=NEG).view(b, h, n, page, d).amax(3)
    return mn, mx


@register_method
@dataclass
class BlockTopK(AttentionMethod):
    name: ClassVar[str] = "block_topk"
    supports_mass: ClassVar[bool] = True
    budget_units: ClassVar[str] = "prefill: ceil(tokens/block) key blocks per query block; decode: ceil(tokens/page) pages"

    budget: float | str | None = 0.25
    block: int = 64
    page: int = 32

    def validate(self) -> None:
        if self.block < 1 or self.page < 1:
            raise BadInputError("block_topk needs block >= 1 and page >= 1")

    # ---- prefill ---------------------------------------------------------------------------------------------
    def select(self, call: AttnCall) -> BlockSelection:
        bs, dev = self.block, call.q.device
        b, hq = call.q.shape[:2]
        nq, nk = -(-call.tq // bs), -(-call.tk // bs)
        off = call.tk - call.tq
        j = torch.arange(nq, device=dev)
        last_q = torch.clamp((j + 1) * bs, max=call.tq) - 1 + off  # position of each block's last query
        kb0, kb1 = (off + j * bs) // bs, last_q // bs
        kidx = torch.arange(nk, device=dev)

        qm = block_means(call.q, bs)  # (B, Hq, nq, D)
        km = block_means(call.k, bs)  # (B, Hkv, nk, D)
        scores = torch.einsum("bgrqd,bgkd->bgrqk", qm.view(b, -1, call.n_rep, nq, qm.shape[-1]), km)
        scores = scores.reshape(b, hq, nq, nk) * call.scale
        causal = kidx[None, :] <= kb1[:, None]  # (nq, nk)
        forced = (kidx[None, :] == 0) | ((kidx[None, :] >= kb0[:, None]) & causal)
        n_forced = forced.sum(-1)
        ctx = last_q + 1
        want = torch.tensor([math.ceil(self.budget_rule.tokens(int(c)) / bs) for c in ctx.tolist()], device=dev)
        count = torch.maximum(torch.minimum(want, kb1 + 1), n_forced)  # (nq,)
        ranked = scores.masked_fill(~causal, NEG).masked_fill(forced, float("inf"))
        if self.mass is not None:
            count = self._mass_count(scores, causal, ranked, bs, call.tk, n_forced)
            width = int(count.max())
        else:
            count = count.expand(b, hq, nq)
            width = int(count.max())
        index = ranked.topk(width, dim=-1).indices.to(torch.int32)
        return BlockSelection(index.contiguous(), count.to(torch.int32).contiguous(), bs, bs, call.tq, call.tk)

    def _mass_count(self, scores, causal, ranked, bs, tk, n_forced) -> torch.Tensor:
        """Smallest number of blocks (best first, forced first) whose estimated attention mass reaches ``mass``."""
        nk = scores.shape[-1]
        sizes = torch.full((nk,), float(bs), device=scores.device)
        sizes[-1] = tk - (nk - 1) * bs
        logits = (scores + sizes.log()).masked_fill(~causal, NEG)
        probs = torch.softmax(logits, -1)
        order = ranked.sort(-1, descending=True).indices
        cum = probs.gather(-1, order).cumsum(-1)
        need = (cum < self.mass - 1e-6).sum(-1) + 1
        return torch.maximum(torch.minimum(need, causal.sum(-1)), n_forced)

    # ---- decode (Quest) --------------------------------------------------------------------------------------
    def select_decode(self, call: AttnCall) -> PageSelection:
        ps, dev = self.page, call.q.device
        b, hkv = call.k.shape[:2]
        n_pages = -(-call.tk // ps)
        mn, mx = self._bounds(call)  # (b, Hkv, n_pages, D)
        q = call.q.float().reshape(b, hkv, call.n_rep * call.tq, -1)
        # sum_d max(q_d mn_d, q_d mx_d) = q+ . mx + q- . mn: two small matmuls, no (pages x D) temporaries
        upper = (q.clamp(min=0) @ mx.transpose(-1, -2) + q.clamp(max=0) @ mn.transpose(-1, -2)).amax(2)
        pidx = torch.arange(n_pages, device=dev)
        first_query_page = (call.tk - call.tq) // ps
        forced = (pidx == 0) | (pidx >= first_query_page)
        n_forced = int(forced.sum())
        want = math.ceil(self.budget_rule.tokens(call.tk) / ps)
        count = max(n_forced, min(want, n_pages))
        ranked = upper.masked_fill(forced, float("inf"))
        index = ranked.topk(count, dim=-1).indices.to(torch.int32)
        page_count = torch.full((b, hkv), count, dtype=torch.int32, device=dev)
        return PageSelection(index.contiguous(), page_count, ps, call.n_rep, call.tq, call.tk)

    def _bounds(self, call: AttnCall) -> tuple[torch.Tensor, torch.Tensor]:
        ps = self.page
        full = call.tk // ps
        cache = call.cache
        if cache is None:
            return page_bounds(call.k, ps)
        key = ("quest", call.key_offset)
        mn, mx = cache.state.get(key, (None, None))
        have = 0 if mn is None else mn.shape[2]
        if have > full or (mn is not None and mn.shape[0] != call.k.shape[0]):
            mn = mx = None
            have = 0
        if have < full:
            new_mn, new_mx = page_bounds(call.k[:, :, have * ps : full * ps], ps)
            mn = new_mn if mn is None else torch.cat([mn, new_mn], 2)
            mx = new_mx if mx is None else torch.cat([mx, new_mx], 2)
            cache.state[key] = (mn, mx)
        if full * ps < call.tk:
            tail_mn, tail_mx = page_bounds(call.k[:, :, full * ps :], ps)
            if mn is None:
                return tail_mn, tail_mx
            return torch.cat([mn, tail_mn], 2), torch.cat([mx, tail_mx], 2)
        return mn, mx

    def make_cache_layer(self, runtime: Any) -> SeqtoolCacheLayer:
        return SeqtoolCacheLayer(runtime)
