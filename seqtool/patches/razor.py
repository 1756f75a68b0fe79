"""RazorAttention: full KV for retrieval heads; sinks + window + one compensation token for every other head.

Per-head policy. *Retrieval heads* are KV heads found offline (:func:`find_retrieval_heads`: the heads whose second-copy
queries on a synthetic repeated sequence attend to the token after the earlier occurrence); ``retrieval_share`` of
all KV heads of the model (ranked across layers) are kept full. They attend every causal key. The other KV heads
(and their query heads) attend the ``sink_blocks`` first blocks and a window of ``n_local`` blocks ending at the
query's block; everything in between is summarised by one *compensation token* whose key / value are the means of
the dropped keys / values and whose attention weight counts for all ``n`` dropped tokens (its logit gets
``+ log n``), merged with the kept part through ``kernels.merge_attn_states``.

Budget → units: KV kept per non-retrieval head, ``tokens = budget.tokens(prompt length)`` (a ratio is resolved once
against the prompt, as the paper's ``N / C`` buffer), rounded up to blocks: ``n_local = ceil(tokens / block) -
sink_blocks`` (at least 1). The share of retrieval heads is its own option.

With :func:`seqtool.patches.make_cache`, :class:`RazorCacheLayer` stores the two kinds of heads separately: the
retrieval heads' KV ``(B, Hr, T, D)`` is the layer's ``keys`` / ``values`` (what the model layer passes to the
attention function), the other heads' KV ``(B, Hn, L, D)`` holds only sinks + window (``L`` stays bounded) and
three running sums hold the compensation token. Eviction is block-granular, so a full forward, prefill and every
decode step select exactly the same keys.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from seqtool.errors import BadInputError, NotImplementedMethodError
from seqtool.patches import _ops as kernels
from seqtool.patches.base import AttentionMethod, AttnCall
from seqtool.patches.cache import SeqtoolCacheLayer
from seqtool.patches.registry import register_method
from seqtool.patches.selection import BlockSelection, KeptSelection, Selection, causal_pairs

_NEVER = 1 << 40  # n_local of the full budget: every block stays in the window


def parse_heads(heads: tuple[str, ...] | list[str] | None) -> dict[int, list[int]]:
    """``("0.1", "3.0")`` (layer.kv_head) → ``{0: [1], 3: [0]}``."""
    out: dict[int, list[int]] = {}
    for item in heads or ():
        try:
            layer, head = (int(x) for x in str(item).split("."))
        except ValueError:
            raise BadInputError(f"razor heads are layer.kv_head pairs like 0.1, got {item!r}") from None
        out.setdefault(layer, []).append(head)
    return {k: sorted(set(v)) for k, v in out.items()}


def find_retrieval_heads(model: nn.Module, share: float, *, length: int = 64, batch: int = 4,
                         seed: int = 0) -> tuple[str, ...]:
    """The ``round(share * layers * Hkv)`` KV heads with the highest induction score on the copy probe.

    A KV head scores the max over its query heads. Returns ``("layer.kv_head", ...)`` sorted.
    """
    from seqtool.arch.registry import head_counts
    from seqtool.patches._probe import induction_scores

    n_heads, n_kv, _ = head_counts(model.config)
    scores = induction_scores(model, length=length, batch=batch, seed=seed)  # (L, Hq)
    per_kv = scores.view(scores.shape[0], n_kv, n_heads // n_kv).amax(-1)
    n_keep = int(round(share * per_kv.numel()))
    if n_keep == 0:
        return ()
    top = torch.topk(per_kv.flatten(), n_keep).indices.tolist()
    return tuple(f"{i // n_kv}.{i % n_kv}" for i in sorted(top))


@dataclass
class RazorSelection(Selection):
    """Retrieval query heads ``ret_q`` attend every causal key; the others (``non_q``) attend the key blocks of
    ``blocks`` (in the coordinates of ``nk`` / ``nv``, the non-retrieval KV the call can see) plus, per query
    block, a compensation token ``comp_k`` / ``comp_v`` ``(b, Hn, nq, D)`` standing for ``comp_n`` ``(nq,)``
    dropped tokens. ``orig_blocks`` is the same block set in the original key positions (``mask`` / counts)."""

    batch: int
    heads: int
    tq: int
    tk: int
    ret_q: torch.Tensor
    ret_kv: torch.Tensor
    non_q: torch.Tensor
    nk: torch.Tensor
    nv: torch.Tensor
    blocks: BlockSelection
    orig_blocks: BlockSelection
    comp_k: torch.Tensor
    comp_v: torch.Tensor
    comp_n: torch.Tensor
    compensate: bool = True

    def attend(self, q, k, v, scale):
        out = q.new_zeros(q.shape)
        if self.ret_q.numel():
            kept = KeptSelection(self.batch, self.ret_q.numel(), self.tq, self.tk, q.device)
            out[:, self.ret_q] = kept.attend(q[:, self.ret_q], k[:, self.ret_kv], v[:, self.ret_kv], scale)
        if self.non_q.numel():
            qn = q[:, self.non_q]
            b = self.blocks
            o, lse = kernels.block_sparse_attn(qn, self.nk, self.nv, b.block_index, b.block_count, block_q=b.block_q,
                                               block_k=b.block_k, scale=scale, return_lse=True)
            if self.compensate and bool((self.comp_n > 0).any()):
                o, lse = self._merge_compensation(qn, o, lse, scale)
            out[:, self.non_q] = o.to(out.dtype)
        return out

    def _merge_compensation(self, qn, o, lse, scale):
        b, hnq, tq, d = qn.shape
        hn = self.comp_k.shape[1]
        qblock = torch.arange(tq, device=qn.device) // self.blocks.block_q
        kc = self.comp_k[:, :, qblock]  # (b, Hn, tq, D)
        vc = self.comp_v[:, :, qblock]
        n = self.comp_n[qblock].float()
        logit = (qn.float().view(b, hn, hnq // hn, tq, d) * kc[:, :, None]).sum(-1) * scale
        lse_c = torch.where(n > 0, logit + torch.log(n.clamp(min=1)), torch.full_like(logit, float("-inf")))
        o_c = vc[:, :, None].expand(b, hn, hnq // hn, tq, d).reshape(b, hnq, tq, d).to(o.dtype)
        return kernels.merge_attn_states(o, lse, o_c, lse_c.reshape(b, hnq, tq))

    def kept_pairs(self):
        out = torch.full((self.batch, self.heads), float(causal_pairs(self.tq, self.tk)), device=self.nk.device)
        if self.non_q.numel():
            out[:, self.non_q] = self.orig_blocks.kept_pairs().to(out.device)
        return out

    def mask(self):
        out = self._causal(self.nk.device).expand(self.batch, self.heads, self.tq, self.tk).clone()
        if self.non_q.numel():
            out[:, self.non_q] = self.orig_blocks.mask()
        return out

    def compensation(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per query block: mean dropped key / value ``(b, Hn, nq, D)`` and dropped-token count ``(nq,)``."""
        return self.comp_k, self.comp_v, self.comp_n


@register_method
@dataclass
class RazorMethod(AttentionMethod):
    """RazorAttention; see the module docstring. ``heads``: retrieval KV heads as ``layer.kv_head`` (found by
    :meth:`prepare` / :func:`find_retrieval_heads` when not given)."""

    name = "razor"
    budget_units = ("KV tokens kept per non-retrieval head: sink_blocks + ceil(tokens/block) - sink_blocks window "
                    "blocks (ratio resolved against the prompt length) + 1 compensation token")

    block: int = 64
    sink_blocks: int = 1
    retrieval_share: float = 0.15
    heads: tuple[str, ...] | None = None
    compensate: bool = True
    evict: bool = True

    def validate(self) -> None:
        if self.block < 1 or self.sink_blocks < 0:
            raise BadInputError("razor needs block >= 1 and sink_blocks >= 0")
        if not 0 <= self.retrieval_share <= 1:
            raise BadInputError(f"retrieval_share must be in [0, 1], got {self.retrieval_share}")
        if self.heads is not None:
            self.heads = tuple(str(h) for h in self.heads)
        self._by_layer = parse_heads(self.heads)

    def prepare(self, model: nn.Module) -> None:
        """Find the retrieval heads on the copy probe unless ``heads`` was given (needs the unpatched model)."""
        if self.heads is None:
            self.heads = find_retrieval_heads(model, self.retrieval_share)
            self._by_layer = parse_heads(self.heads)

    def retrieval_kv_heads(self, layer: int, n_kv: int) -> list[int]:
        if self.heads is None:
            if self.retrieval_share == 0:
                return []
            raise BadInputError("razor needs its retrieval heads: apply it with seqtool.patches.razor.apply_razor("
                                "model, ...) or pass heads=layer.kv_head,... (see find_retrieval_heads)")
        heads = self._by_layer.get(layer, [])
        if heads and max(heads) >= n_kv:
            raise BadInputError(f"razor head {layer}.{max(heads)} out of range: layer {layer} has {n_kv} KV heads")
        return heads

    def n_local(self, prompt_len: int) -> int:
        if self.budget_rule.is_full:
            return _NEVER
        return max(1, math.ceil(self.budget_rule.tokens(prompt_len) / self.block) - self.sink_blocks)

    # ---- selection ---------------------------------------------------------------------------------------------
    def select(self, call: AttnCall) -> Selection:
        return self._select(call, full=False)

    def dense_selection(self, call: AttnCall) -> Selection:
        # The split cache hands the attention function only the retrieval heads: dense must go through here too.
        return self._select(call, full=True)

    def _select(self, call: AttnCall, full: bool) -> Selection:
        cache = call.cache if isinstance(call.cache, RazorCacheLayer) else None
        b, hq, tq, d = call.q.shape
        dev = call.q.device
        if cache is not None:
            ret, non = cache.ret_heads, cache.non_heads
            n_kv = len(ret) + len(non)
            ret_kv = torch.arange(len(ret), device=dev)
            nk, nv, dropped, ck, cv, cn = cache.local_view(call.rows, call.tk)
            if full:
                n_local = _NEVER
            else:
                n_local = cache.resolve_window(call.rows, call.key_offset, self.n_local(call.tk))
        else:
            n_kv = call.k.shape[1]
            ret = self.retrieval_kv_heads(call.layer_idx, n_kv)
            non = [h for h in range(n_kv) if h not in ret]
            ret_kv = torch.tensor(ret, dtype=torch.long, device=dev)
            non_t = torch.tensor(non, dtype=torch.long, device=dev)
            nk, nv = call.k[:, non_t], call.v[:, non_t]
            dropped, cn = 0, 0
            ck = cv = call.k.new_zeros(b, len(non), d, dtype=torch.float32)
            n_local = _NEVER if full else self.n_local(call.tk)
        g = hq // n_kv
        ret_q = torch.tensor([h * g + j for h in ret for j in range(g)], dtype=torch.long, device=dev)
        non_q = torch.tensor([h * g + j for h in non for j in range(g)], dtype=torch.long, device=dev)
        blocks, orig, comp_k, comp_v, comp_n = self._blocks(call.tq, call.tk, n_local, nk, nv, dropped, ck, cv, cn,
                                                            len(non_q))
        return RazorSelection(b, hq, tq, call.tk, ret_q, ret_kv, non_q, nk, nv, blocks, orig, comp_k, comp_v, comp_n,
                              self.compensate)

    def _blocks(self, tq, tk, n_local, nk, nv, dropped, ck, cv, cn, heads):
        """Sink + window blocks per query block in original and in local (after ``dropped`` evicted blocks)
        coordinates, and the compensation token of each query block."""
        bs, dev = self.block, nk.device
        b, hn, tkl, d = nk.shape
        nq = -(-tq // bs)
        first = torch.arange(nq, device=dev) * bs + (tk - tq)
        last = torch.clamp(first + bs - 1, max=tk - 1)
        first_blk, last_blk = first // bs, last // bs
        n_sink = torch.clamp(last_blk + 1, max=self.sink_blocks)
        win_lo = torch.maximum(first_blk - min(n_local, _NEVER) + 1, n_sink)
        if dropped and bool((win_lo < self.sink_blocks + dropped).any()):
            raise NotImplementedMethodError("razor: these queries need keys the cache already evicted; decode one "
                                            "token at a time after the prompt")
        width = self.sink_blocks + int((last_blk - win_lo + 1).max()) if nq else 0
        slot = torch.arange(width, device=dev)[None, :]
        n_win = last_blk - win_lo + 1
        count = n_sink + n_win
        shift = torch.where(slot < n_sink[:, None], 0, dropped)

        def index(offset):
            idx = torch.where(slot < n_sink[:, None], slot, win_lo[:, None] + slot - n_sink[:, None])
            idx = torch.where(slot < count[:, None], idx - offset, 0)
            return idx.to(torch.int32).expand(b, heads, nq, width).contiguous()

        cnt = count.to(torch.int32).expand(b, heads, nq).contiguous()
        orig = BlockSelection(index(0), cnt, bs, bs, tq, tk)
        local = BlockSelection(index(shift), cnt, bs, bs, tq, tkl)
        # Dropped blocks [n_sink, win_lo): the evicted ones are in (ck, cv, cn); the rest are still in nk / nv.
        nkb = -(-tkl // bs)
        pad = nkb * bs - tkl
        sums_k = torch.nn.functional.pad(nk.float(), (0, 0, 0, pad)).view(b, hn, nkb, bs, d).sum(3)
        sums_v = torch.nn.functional.pad(nv.float(), (0, 0, 0, pad)).view(b, hn, nkb, bs, d).sum(3)
        pre_k = torch.nn.functional.pad(sums_k.cumsum(2), (0, 0, 1, 0))
        pre_v = torch.nn.functional.pad(sums_v.cumsum(2), (0, 0, 1, 0))
        # (after eviction n_sink == sink_blocks, so local block j >= sink_blocks is original block j + dropped)
        lo = n_sink
        hi = torch.clamp(win_lo - dropped, min=lo)
        comp_n = (hi - lo) * bs + cn
        comp_k = pre_k[:, :, hi] - pre_k[:, :, lo] + ck[:, :, None]
        comp_v = pre_v[:, :, hi] - pre_v[:, :, lo] + cv[:, :, None]
        denom = comp_n.clamp(min=1).float()[None, None, :, None]
        return local, orig, comp_k / denom, comp_v / denom, comp_n

    def make_cache_layer(self, runtime: Any) -> SeqtoolCacheLayer | None:
        if not self.evict:
            return None
        return RazorCacheLayer(runtime, self)


class RazorCacheLayer(SeqtoolCacheLayer):
    """Split KV: ``keys`` / ``values`` hold the retrieval heads ``(B, Hr, T, D)`` (all tokens; what the layer passes
    to attention), ``nk`` / ``nv`` the other heads ``(B, Hn, L, D)`` with only sinks + window kept (right-aligned
    per row: row ``r``'s valid slots are its last ``T - pad_r - dropped_r * block``), and ``ck`` / ``cv`` / ``cn`` the
    sums and count of every evicted key / value (the compensation token)."""

    def __init__(self, runtime: Any, method: RazorMethod):
        super().__init__(runtime)
        self.method = method
        layer = runtime.layer_idx if runtime is not None else 0
        self.layer_idx = layer
        self.ret_heads: list[int] = []
        self.non_heads: list[int] = []
        self.nk = self.nv = self.ck = self.cv = None
        self.cn: torch.Tensor | None = None  # (B,) evicted tokens per row
        self.evicted_blocks: torch.Tensor | None = None  # (B,) evicted blocks per row
        self.window: torch.Tensor | None = None  # (B,) n_local per row, -1 until resolved

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        b, n_kv, t, d = key_states.shape
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.ret_heads = self.method.retrieval_kv_heads(self.layer_idx, n_kv)
            self.non_heads = [h for h in range(n_kv) if h not in self.ret_heads]
            empty = key_states.new_zeros(b, len(self.non_heads), 0, d)
            self.keys = key_states.new_zeros(b, len(self.ret_heads), 0, d)
            self.values = value_states.new_zeros(b, len(self.ret_heads), 0, value_states.shape[-1])
            self.nk, self.nv = empty, value_states.new_zeros(b, len(self.non_heads), 0, value_states.shape[-1])
            self.ck = key_states.new_zeros(b, len(self.non_heads), d, dtype=torch.float32)
            self.cv = value_states.new_zeros(b, len(self.non_heads), value_states.shape[-1], dtype=torch.float32)
            self.cn = torch.zeros(b, dtype=torch.long, device=key_states.device)
            self.evicted_blocks = torch.zeros(b, dtype=torch.long, device=key_states.device)
            self.window = torch.full((b,), -1, dtype=torch.long, device=key_states.device)
        ret, non = self.ret_heads, self.non_heads
        self.keys = torch.cat([self.keys, key_states[:, ret]], 2)
        self.values = torch.cat([self.values, value_states[:, ret]], 2)
        self.nk = torch.cat([self.nk, key_states[:, non]], 2)
        self.nv = torch.cat([self.nv, value_states[:, non]], 2)
        self.cumulative_length += t
        if self.runtime is not None:
            self.runtime.pending_cache = self
        return self.keys, self.values

    def kept_length(self) -> int:
        return self.cumulative_length

    def local_view(self, rows: torch.Tensor, tk: int):
        """Non-retrieval KV of ``rows`` (one padding group, ``tk`` valid tokens): ``(nk, nv, dropped blocks,
        ck, cv, cn)`` with ``nk`` ``(b, Hn, tk - dropped * block, D)``."""
        dropped = self.evicted_blocks[rows]
        if bool((dropped != dropped[0]).any()):
            raise NotImplementedMethodError("razor: rows with equal padding evicted differently; reset the cache")
        d0 = int(dropped[0])
        n_valid = tk - d0 * self.method.block
        nk = self.nk[rows][:, :, self.nk.shape[2] - n_valid:]
        nv = self.nv[rows][:, :, self.nv.shape[2] - n_valid:]
        cn = int(self.cn[rows][0])
        return nk, nv, d0, self.ck[rows], self.cv[rows], cn

    def resolve_window(self, rows: torch.Tensor, key_offset: int, n_local: int) -> int:
        """The window of these rows, fixed at their first call (the prompt)."""
        current = self.window[rows]
        if bool((current < 0).all()):
            self.window[rows] = n_local
            return n_local
        return int(current.max())

    def after_attention(self, kv_start: torch.Tensor) -> None:
        m = self.method
        bs, sink = m.block, m.sink_blocks
        total = self.keys.shape[2]
        seen = total - kv_start.long()  # valid tokens per row
        nxt = seen // bs  # block of the next query
        drop_to = torch.clamp(nxt - self.window + 1, min=sink)
        drop_to = torch.where(self.window < 0, sink + self.evicted_blocks, drop_to)
        new = (drop_to - sink - self.evicted_blocks).clamp(min=0)
        if not bool((new > 0).any()):
            return
        width_old = self.nk.shape[2]
        kept_len = seen - (self.evicted_blocks + new) * bs
        width = int(kept_len.max())
        dev = self.nk.device
        index = torch.zeros(self.nk.shape[0], width, dtype=torch.long, device=dev)
        for r in range(self.nk.shape[0]):
            valid = int(seen[r] - self.evicted_blocks[r] * bs)
            base = width_old - valid  # physical slot of the row's first valid local token
            n_s = min(sink * bs, valid)
            cut_lo, cut_hi = base + sink * bs, base + sink * bs + int(new[r]) * bs
            if new[r] > 0:
                self.ck[r] += self.nk[r, :, cut_lo:cut_hi].float().sum(1)
                self.cv[r] += self.nv[r, :, cut_lo:cut_hi].float().sum(1)
                self.cn[r] += cut_hi - cut_lo
            keep = torch.cat([torch.arange(base, base + n_s, device=dev),
                              torch.arange(cut_hi if new[r] > 0 else base + n_s, width_old, device=dev)])
            index[r, width - keep.numel():] = keep
        self.nk = torch.gather(self.nk, 2, index[:, None, :, None].expand(-1, self.nk.shape[1], -1, self.nk.shape[-1]))
        self.nv = torch.gather(self.nv, 2, index[:, None, :, None].expand(-1, self.nv.shape[1], -1, self.nv.shape[-1]))
        self.evicted_blocks = self.evicted_blocks + new
        self.evicted_tokens += int(new.sum()) * bs

    def cache_bytes(self) -> int:
        """Bytes held for this layer (both KV stores and the compensation sums)."""
        tensors = (self.keys, self.values, self.nk, self.nv, self.ck, self.cv)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def reset(self) -> None:
        super().reset()
        self.nk = self.nv = self.ck = self.cv = self.cn = self.evicted_blocks = self.window = None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        for name in ("nk", "nv", "ck", "cv", "cn", "evicted_blocks", "window"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for name in ("nk", "nv", "ck", "cv", "cn", "evicted_blocks", "window"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, beam_idx.to(t.device)))


def apply_razor(model: nn.Module, **options: Any):
    """``apply_patch(model, "razor", ...)`` after finding the retrieval heads on the unpatched model."""
    from seqtool.patches.runtime import apply_patch, get_handle

    if options.get("heads") is None:
        previous = get_handle(model)
        if previous is not None:
            previous.remove()
        share = float(options.get("retrieval_share", RazorMethod.retrieval_share))
        options["heads"] = find_retrieval_heads(model, share)
    return apply_patch(model, "razor", **options)
