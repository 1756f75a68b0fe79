"""Training-time grouped attention for context extension: LongLoRA's S²-Attn and SinkLoRA's SF-Attn.

Both split the sequence into groups of ``group_size`` tokens and attend causally inside a group only, so a
step at T tokens costs about ``1/#groups`` of dense causal attention. The second half of the query heads
(``H // 2 ..``) uses groups offset by half a group, so information flows between neighbouring groups.

- ``s2attn`` (LongLoRA): the shifted heads' tokens are rolled left by ``group_size // 2`` *with wrap-around*,
  exactly as LongLoRA's ``roll``: their last group holds the sequence's last half group followed by its first
  half group, causal in that rolled order (so, as in LongLoRA, the first half group of those heads also sees
  the last one). Outputs are rolled back.
- ``sinklora`` (SinkLoRA SF-Attn): the shifted heads' segments are put back at their original positions
  instead of wrapping: the first half group is its own (causal) segment at the front, the last half group its
  own segment at the end (the segment swap: no group mixes the sequence's start with its end). Every group of
  every head also attends to ``sinks`` global sink tokens (the first ``sinks`` positions, causally).

A group size >= the sequence length is one group and no shift: ordinary causal attention.
Odd lengths are **padded** internally (pad slots are never attended by a real query; their outputs are
dropped); the CLI refuses a group size that does not divide ``--context``.

Registered with transformers' ``AttentionInterface`` (name :data:`ATTN_NAME`) plus a mask function that passes
only the 2D padding mask, by :func:`apply_shifted_attention` (a reversible handle); nothing is registered on
import. Memory: per call one ``(groups, G, sinks + G)`` score block per head (SDPA over groups batched as a
reshape); no ``T x T`` tensor. GQA k/v are not repeated (SDPA ``enable_gqa``) where the head split allows it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seqtool.errors import BadInputError

ATTN_NAME = "seqtool_shifted"
METHODS = ("s2attn", "sinklora")
SPEC_ATTR = "_seqtool_shifted_spec"
HANDLE_ATTR = "_seqtool_shifted_handle"
DEFAULT_SINKS = 4


@dataclass(frozen=True)
class ShiftedSpec:
    """What one attention module runs: ``method`` in :data:`METHODS`, group size in tokens, sink tokens."""

    method: str
    group_size: int
    sinks: int = 0
    impl: str = "fast"  # "fast" (grouped SDPA) or "reference" (masked dense, tests only)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise BadInputError(f"unknown long-context attention '{self.method}'; choose one of {', '.join(METHODS)}")
        if int(self.group_size) < 2:
            raise BadInputError(f"group size must be at least 2 tokens, got {self.group_size}")
        if self.sinks < 0:
            raise BadInputError(f"sinks must be >= 0, got {self.sinks}")
        if self.method == "s2attn" and self.sinks:
            raise BadInputError("s2attn has no sink tokens; use --method sinklora for --sinks")
        if self.impl not in ("fast", "reference"):
            raise ValueError(f"impl must be 'fast' or 'reference', got {self.impl!r}")


# ---- layout: which original position sits in each group slot --------------------------------------------------
def group_layout(seq_len: int, group_size: int, *, shifted: bool, wrap: bool) -> torch.Tensor:
    """``(n_groups, G)`` long tensor: the original position in each slot of each group, -1 for a pad slot.

    Unshifted: ``[0..G-1], [G..2G-1], ...``. Shifted with ``wrap`` (LongLoRA): the positions rolled left by
    ``G // 2`` (``[h..T-1, 0..h-1]``) then cut into groups. Shifted without wrap (SinkLoRA): ``h`` pad slots then
    ``0..T-1``, so the first half group is its own segment. A tail that does not fill a group is padded.
    """
    if group_size >= seq_len:
        return torch.arange(seq_len).view(1, seq_len)
    half = group_size // 2
    order = torch.arange(seq_len)
    if shifted and wrap:
        order = torch.roll(order, -half)
    elif shifted:
        order = torch.cat([torch.full((half,), -1), order])
    n_groups = math.ceil(order.numel() / group_size)
    pad = n_groups * group_size - order.numel()
    return torch.cat([order, torch.full((pad,), -1)]).view(n_groups, group_size)


def _head_split(n_heads: int, seq_len: int, group_size: int) -> int:
    """Index of the first shifted head (``n_heads`` = none shifted when the sequence is one group)."""
    return n_heads if group_size >= seq_len else n_heads // 2


def _group_mask(layout: torch.Tensor, n_sinks: int, key_valid: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean ``([B,] n, G, S + G)`` mask (True = attend) over ``[sinks | group keys]``; None = plain causal.

    Inside a group: causal in slot order, pad keys excluded. Sink ``j`` is visible to a query at position p when
    ``j <= p`` and ``j`` is not already in that group. The diagonal is always kept so no row is empty.
    """
    n, g = layout.shape
    real = layout >= 0
    pads_before_real = bool((~real[:, :-1] & real[:, 1:]).any())
    if n_sinks == 0 and key_valid is None and not pads_before_real:
        return None
    slot = torch.arange(g, device=layout.device)
    inner = (slot[None, :] <= slot[:, None])[None] & real[:, None, :]  # (n, G, G)
    sink_pos = torch.arange(n_sinks, device=layout.device)
    in_group = (layout[:, :, None] == sink_pos[None, None, :]).any(1)  # (n, S)
    sinks = (sink_pos[None, None, :] <= layout[:, :, None]) & ~in_group[:, None, :]  # (n, G, S)
    if key_valid is not None:  # (B, T) -> gather per slot
        kv = key_valid[:, layout.clamp(min=0)]  # (B, n, G)
        inner = inner[None] & kv[:, :, None, :]
        sinks = sinks[None] & key_valid[:, None, None, :n_sinks]
    inner = inner | torch.eye(g, dtype=torch.bool, device=layout.device)
    return torch.cat([sinks, inner], dim=-1)


def _kv_heads_for(h0: int, h1: int, n_rep: int, k: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The k/v heads serving query heads ``[h0, h1)``; repeated only if the split cuts a GQA group."""
    if h0 % n_rep == 0 and (h1 - h0) % n_rep == 0:
        return k[:, h0 // n_rep: h1 // n_rep], n_rep > 1
    kv0, kv1 = h0 // n_rep, (h1 - 1) // n_rep + 1
    rep = k[:, kv0:kv1].repeat_interleave(n_rep, dim=1)
    return rep[:, h0 - kv0 * n_rep: h1 - kv0 * n_rep], False


def _to_groups(x: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """``(B, h, T, D)`` -> ``(B*n, h, G, D)``: the tokens of each group's slots (pad slots read position 0)."""
    b, h, t, d = x.shape
    n, g = layout.shape
    flat = layout.flatten()
    if not (n * g == t and bool((flat == torch.arange(t, device=flat.device)).all())):
        x = x.index_select(2, flat.clamp(min=0))
    return x.reshape(b, h, n, g, d).transpose(1, 2).reshape(b * n, h, g, d)


def _from_groups(out: torch.Tensor, layout: torch.Tensor, b: int, t: int, first: int = 0) -> torch.Tensor:
    """``(B*n, h, G, D)`` in slot order -> ``(B, h, t - first, D)``: positions ``first..t-1`` in order (the layout
    holds each of them once; pad slots are dropped)."""
    n, g = layout.shape
    h, d = out.shape[1], out.shape[3]
    out = out.reshape(b, n, h, g, d).transpose(1, 2).reshape(b, h, n * g, d)
    flat = layout.flatten()
    real = flat >= 0
    slot_of = torch.empty(t - first, dtype=torch.long, device=out.device)
    slot_of[flat[real] - first] = torch.arange(n * g, device=out.device)[real]
    if n * g == t - first and bool((slot_of == torch.arange(t - first, device=out.device)).all()):
        return out
    return out.index_select(2, slot_of)


def _sink_prefix_ok(layout: torch.Tensor, n_sinks: int) -> int:
    """Length m of group 0's real prefix if the mask-free sink path applies (group 0 = positions 0..m-1 after
    leading pads, m >= sinks, no other group has a pad before a real slot), else 0."""
    first = layout[0][layout[0] >= 0]
    m = first.numel()
    if m < n_sinks or not bool((first == torch.arange(m, device=layout.device)).all()):
        return 0
    rest = layout[1:] >= 0
    if bool((~rest[:, :-1] & rest[:, 1:]).any()) or not bool(rest[:, 0].all()):
        return 0
    return m


def _grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: torch.Tensor, n_sinks: int,
                  key_valid: torch.Tensor | None, gqa: bool, dropout: float, scaling: float | None) -> torch.Tensor:
    """q ``(B, h, T, D)``, k/v ``(B, hk, T, D)`` -> ``(B, h, T, D)``: SDPA per group of ``layout``, batched.

    Three paths, all exact: (1) no sinks, no padding, pads only after real slots: causal SDPA per group, no
    mask; (2) sinks, no padding: group 0 (which holds the sinks) is plain causal over its real prefix, every
    other group runs causal SDPA over ``[sinks | group]`` queries and keys and drops the sink-query rows, still
    mask-free; (3) otherwise an explicit ``(G, sinks + G)`` boolean mask per group.
    """
    b, _, t, _ = q.shape
    layout = layout.to(q.device)
    sdpa = dict(dropout_p=dropout, scale=scaling, enable_gqa=gqa)
    leading_pads = bool((layout[0] < 0).any()) and bool((layout[0] >= 0).any())
    use_prefix = (n_sinks or leading_pads) and key_valid is None and layout.shape[0] > 1
    prefix = _sink_prefix_ok(layout, n_sinks) if use_prefix else 0
    if prefix:
        head = F.scaled_dot_product_attention(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix],
                                              is_causal=True, **sdpa)
        rest = layout[1:]
        n = rest.shape[0]

        def with_sinks(x: torch.Tensor) -> torch.Tensor:
            hx, d = x.shape[1], x.shape[3]
            sinks = x[:, :, :n_sinks].unsqueeze(1).expand(b, n, hx, n_sinks, d).reshape(b * n, hx, n_sinks, d)
            return torch.cat([sinks, _to_groups(x, rest)], dim=2)

        out = F.scaled_dot_product_attention(with_sinks(q), with_sinks(k), with_sinks(v), is_causal=True, **sdpa)
        return torch.cat([head, _from_groups(out[:, :, n_sinks:], rest, b, t, first=prefix)], dim=2)
    qg, kg, vg = _to_groups(q, layout), _to_groups(k, layout), _to_groups(v, layout)
    mask = _group_mask(layout, n_sinks, key_valid)
    if n_sinks:
        def prepend_sinks(x: torch.Tensor, xg: torch.Tensor) -> torch.Tensor:
            n, hx, d = layout.shape[0], x.shape[1], x.shape[3]
            sinks = x[:, :, :n_sinks].unsqueeze(1).expand(b, n, hx, n_sinks, d).reshape(b * n, hx, n_sinks, d)
            return torch.cat([sinks, xg], dim=2)

        kg, vg = prepend_sinks(k, kg), prepend_sinks(v, vg)
    if mask is not None:
        mask = mask.unsqueeze(0).expand(b, *mask.shape) if mask.dim() == 3 else mask
        mask = mask.reshape(-1, 1, layout.shape[1], mask.shape[-1])
    out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, is_causal=mask is None, **sdpa)
    return _from_groups(out, layout, b, t)


def shifted_attention_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spec: ShiftedSpec, *,
                              key_valid: torch.Tensor | None = None, dropout: float = 0.0,
                              scaling: float | None = None) -> torch.Tensor:
    """Grouped shifted attention. query ``(B, Hq, T, D)``, key/value ``(B, Hkv, T, D)`` (not repeated),
    ``key_valid`` ``(B, T)`` bool padding mask or None -> ``(B, Hq, T, D)``."""
    b, hq, t, _ = query.shape
    n_rep = hq // key.shape[1]
    g = int(spec.group_size)
    split = _head_split(hq, t, g)
    n_sinks = min(spec.sinks, t) if g < t else 0
    parts = []
    for h0, h1, shifted in ((0, split, False), (split, hq, True)):
        if h1 <= h0:
            continue
        layout = group_layout(t, g, shifted=shifted, wrap=spec.method == "s2attn")
        kh, gqa = _kv_heads_for(h0, h1, n_rep, key)
        vh, _ = _kv_heads_for(h0, h1, n_rep, value)
        parts.append(_grouped_sdpa(query[:, h0:h1], kh, vh, layout, n_sinks, key_valid, gqa, dropout, scaling))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def attention_work(seq_len: int, spec: ShiftedSpec, n_heads: int) -> tuple[int, int]:
    """(query-key pairs the grouped attention computes for real tokens, pairs of dense causal attention), summed
    over ``n_heads`` heads: the work count behind the ``~1/#groups`` claim (sink columns included)."""
    g = int(spec.group_size)
    split = _head_split(n_heads, seq_len, g)
    n_sinks = min(spec.sinks, seq_len) if g < seq_len else 0
    kept = 0
    for heads, shifted in ((split, False), (n_heads - split, True)):
        if heads <= 0:
            continue
        layout = group_layout(seq_len, g, shifted=shifted, wrap=spec.method == "s2attn")
        mask = _group_mask(layout, n_sinks, None)
        if mask is None:
            n, gs = layout.shape
            slot = torch.arange(gs)
            mask = ((slot[None, :] <= slot[:, None])[None] & (layout >= 0)[:, None, :]).expand(n, gs, gs)
            mask = torch.cat([torch.zeros(n, gs, 0, dtype=torch.bool), mask], -1)
        real_q = (layout >= 0)[:, :, None]
        kept += heads * int((mask & real_q).sum())
    return kept, n_heads * seq_len * (seq_len + 1) // 2


# ---- transformers glue --------------------------------------------------------------------------------------
def _dense_causal(query, key, value, key_valid, dropout, scaling) -> torch.Tensor:
    """Fallback for calls with a cache (q_len != kv_len, e.g. generation while the patch is on): dense causal."""
    q_len, kv_len = query.shape[2], key.shape[2]
    offset = kv_len - q_len
    mask = torch.arange(kv_len, device=query.device)[None, :] <= (torch.arange(q_len, device=query.device)[:, None] + offset)
    if key_valid is not None:
        mask = mask[None, None] & key_valid[:, None, None, -kv_len:]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                          enable_gqa=query.shape[1] != key.shape[1])


def seqtool_shifted_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                              sliding_window: int | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The registered attention function. query ``(B, Hq, q, D)``, key/value ``(B, Hkv, kv, D)``,
    ``attention_mask`` a ``(B, kv)`` bool padding mask or None -> ``(out (B, q, Hq, D), None)``."""
    spec: ShiftedSpec | None = getattr(module, SPEC_ATTR, None)
    if spec is None:
        raise BadInputError(f"attention '{ATTN_NAME}' is set on a model without a shifted-attention handle")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise BadInputError("shifted attention takes a 2D padding mask; a prepared 4D mask is not supported")
    key_valid = attention_mask.bool() if attention_mask is not None else None
    drop = dropout if module.training else 0.0
    if query.shape[2] != key.shape[2]:
        out = _dense_causal(query, key, value, key_valid, drop, scaling)
    else:
        if sliding_window is not None and sliding_window < min(spec.group_size, query.shape[2]) + spec.sinks:
            raise BadInputError(f"the model's sliding window ({sliding_window}) is shorter than a group; "
                                "use a smaller --group-size")
        if key_valid is not None:
            key_valid = key_valid[:, -key.shape[2]:]
        if spec.impl == "reference":
            from seqtool.train.shifted_attention_reference import reference_attention

            out = reference_attention(query, key, value, spec, key_valid=key_valid, scaling=scaling)
        else:
            out = shifted_attention_forward(query, key, value, spec, key_valid=key_valid, dropout=drop,
                                            scaling=scaling)
    return out.transpose(1, 2).contiguous(), None


def padding_mask_2d(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                    mask_function: Any = None, attention_mask: torch.Tensor | None = None,
                    **kwargs: Any) -> torch.Tensor | None:
    """Mask function for :data:`ATTN_NAME`: the 2D padding mask ``(B, kv)`` as bool, None when nothing is
    padded (causality is built into the attention function; no ``q x kv`` mask is materialised)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask
    mask = attention_mask.bool()[:, -kv_length:]
    return None if bool(mask.all()) else mask


_ACTIVE: list["ShiftedAttentionHandle"] = []


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, seqtool_shifted_attention)
    AttentionMaskInterface.register(ATTN_NAME, padding_mask_2d)


def _unregister() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface._global_mapping.pop(ATTN_NAME, None)
    AttentionMaskInterface._global_mapping.pop(ATTN_NAME, None)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    from seqtool.arch.registry import attention_module, decoder_layers

    return [attention_module(model, i) for i in range(len(decoder_layers(model)))]


class ShiftedAttentionHandle:
    """Shifted attention applied to one model; ``remove()`` (or leaving the ``with`` block) restores the model's
    previous attention implementation and unregisters the function once no handle is active."""

    def __init__(self, model: nn.Module, spec: ShiftedSpec):
        self.model, self.spec = model, spec
        self._modules = _attention_modules(model)
        self._previous_impl = model.config._attn_implementation
        if not _ACTIVE:
            _register()
        _ACTIVE.append(self)
        for module in self._modules:
            setattr(module, SPEC_ATTR, spec)
        try:
            model.set_attn_implementation(ATTN_NAME)
        except Exception:
            self.remove()
            raise
        setattr(model, HANDLE_ATTR, self)
        self.active = True

    def remove(self) -> None:
        if self not in _ACTIVE:
            return
        for module in self._modules:
            if getattr(module, SPEC_ATTR, None) is self.spec:
                delattr(module, SPEC_ATTR)
        if getattr(self.model, HANDLE_ATTR, None) is self:
            delattr(self.model, HANDLE_ATTR)
            self.model.set_attn_implementation(self._previous_impl or "sdpa")
        _ACTIVE.remove(self)
        if not _ACTIVE:
            _unregister()
        self.active = False

    def work(self, seq_len: int) -> tuple[int, int]:
        """(kept, dense causal) query-key pairs per layer at ``seq_len`` tokens, summed over query heads."""
        return attention_work(seq_len, self.spec, self.model.config.num_attention_heads)

    def __enter__(self) -> "ShiftedAttentionHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def resolve_group_size(context: int, group_size: str | int | None) -> int:
    """``--group-size`` for ``context``-token rows: default a quarter of the context (LongLoRA). A size that does not
    divide the context is refused (not padded), so every training group has the same length."""
    from seqtool.utils import parse_length

    size = context // 4 if group_size is None else parse_length(group_size)
    if size < 2 or context % size:
        raise BadInputError(f"--group-size {size} does not divide the context {context}; seqtool refuses rather than "
                            f"pad: use a divisor such as {max(2, context // 4)}")
    return size


def apply_shifted_attention(model: nn.Module, method: str, *, group_size: int, sinks: int | None = None,
                            impl: str = "fast") -> ShiftedAttentionHandle:
    """Make ``model`` train with ``method`` (``s2attn`` | ``sinklora``) attention in groups of ``group_size``
    tokens (``sinks`` global sink tokens for sinklora, default 4). Use as a context manager or call
    ``handle.remove()``; the model's own attention comes back exactly."""
    if getattr(model, HANDLE_ATTR, None) is not None:
        raise BadInputError("this model already has shifted attention applied; remove that handle first")
    if sinks is None:
        sinks = DEFAULT_SINKS if method == "sinklora" else 0
    return ShiftedAttentionHandle(model, ShiftedSpec(method, int(group_size), int(sinks), impl))
