"""ACT (attention calibration): damp hidden (non-initial) attention sinks in chosen heads. No budget.

For a calibrated head, the *sink columns* are the non-initial keys whose attention, averaged over the last
``probe`` queries of the prompt, exceeds ``alpha / context`` (at most ``max_sinks`` of them, the strongest). Their
attention is multiplied by ``beta`` and the removed mass is handed to the other keys in proportion to their
attention (``a_j *= (1 - beta * a_S) / (1 - a_S)``, ``a_S`` = the sinks' total), so rows still sum to one.

Efficient path: full causal attention runs through ``kernels.block_sparse_attn`` with its log-sum-exp; the
calibration only needs the probabilities of the sink columns, ``exp(q · k_s * scale - lse)``: ``O(T * n_sinks)``
extra work and no ``T x T`` tensor (sink finding scores ``probe x T``). The sinks found on the prompt are kept in
the cache layer's state and reused by every decode step.

Heads to calibrate (``heads``: ``layer.q_head``) are searched offline (:func:`find_calibration_heads`): each head
alone is calibrated on a synthetic copy task and kept when it lowers the loss on the second copy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from seqtool.errors import BadInputError
from seqtool.patches import _ops as kernels
from seqtool.patches.base import AttentionMethod, AttnCall
from seqtool.patches.cache import SeqtoolCacheLayer
from seqtool.patches.registry import register_method
from seqtool.patches.selection import Selection, causal_pairs, full_blocks


def _parse(heads) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for item in heads or ():
        try:
            layer, head = (int(x) for x in str(item).split("."))
        except ValueError:
            raise BadInputError(f"act heads are layer.q_head pairs like 0.3, got {item!r}") from None
        out.setdefault(layer, []).append(head)
    return {k: sorted(set(v)) for k, v in out.items()}


@dataclass
class ActSelection(Selection):
    """Every causal key for every head; ``heads`` (calibrated query heads) damp the ``sinks`` columns
    ``(b, n_heads, S)`` (``sink_ok`` marks real entries)."""

    batch: int
    n_heads: int
    tq: int
    tk: int
    heads: torch.Tensor
    sinks: torch.Tensor | None
    sink_ok: torch.Tensor | None
    beta: float
    block: int
    finder: Any = field(default=None, repr=False)

    def attend(self, q, k, v, scale):
        full = full_blocks(self.batch, self.n_heads, self.tq, self.tk, self.block, q.device)
        out, lse = kernels.block_sparse_attn(q, k, v, full.block_index, full.block_count, block_q=self.block,
                                             block_k=self.block, scale=scale, return_lse=True)
        if not self.heads.numel():
            return out
        if self.sinks is None:
            self.sinks, self.sink_ok = self.finder(q, k, lse)
        if not bool(self.sink_ok.any()):
            return out
        g = q.shape[1] // k.shape[1]
        kv = self.heads // g
        idx = self.sinks.clamp(min=0)
        ks = torch.gather(k.index_select(1, kv).float(), 2, idx[..., None].expand(-1, -1, -1, k.shape[-1]))
        vs = torch.gather(v.index_select(1, kv).float(), 2, idx[..., None].expand(-1, -1, -1, v.shape[-1]))
        qh = q.index_select(1, self.heads).float()
        pos = torch.arange(self.tq, device=q.device) + (self.tk - self.tq)
        seen = (self.sinks[:, :, None, :] <= pos[None, None, :, None]) & self.sink_ok[:, :, None, :]
        p = torch.exp(qh @ ks.transpose(-1, -2) * scale - lse.index_select(1, self.heads)[..., None])
        p = torch.where(seen, p, torch.zeros_like(p))  # (b, h, tq, S)
        a_s = p.sum(-1, keepdim=True)
        o_s = p @ vs
        o = out.index_select(1, self.heads).float()
        ok = a_s < 1 - 1e-6
        rest = (1 - self.beta * a_s) / torch.where(ok, 1 - a_s, torch.ones_like(a_s))
        cal = torch.where(ok, self.beta * o_s + rest * (o - o_s), o)
        out = out.clone()
        out[:, self.heads] = cal.to(out.dtype)
        return out

    def kept_pairs(self):
        return torch.full((self.batch, self.n_heads), float(causal_pairs(self.tq, self.tk)))

    def mask(self):
        return self._causal("cpu").expand(self.batch, self.n_heads, self.tq, self.tk)


@register_method
@dataclass
class ActMethod(AttentionMethod):
    """Attention calibration; see the module docstring."""

    name = "act"
    takes_budget = False
    budget_units = "no budget: every key is attended (accuracy method)"

    heads: tuple[str, ...] | None = None
    alpha: float = 5.0
    beta: float = 0.4
    probe: int = 64
    max_sinks: int = 8
    block: int = 64

    def validate(self) -> None:
        if not 0 <= self.beta <= 1 or self.alpha <= 0 or self.probe < 1 or self.max_sinks < 1 or self.block < 1:
            raise BadInputError("act needs 0 <= beta <= 1, alpha > 0, probe >= 1, max_sinks >= 1, block >= 1")
        if self.heads is not None:
            self.heads = tuple(str(h) for h in self.heads)
        self._by_layer = _parse(self.heads)
        #: layer → (sinks, ok) to use instead of finding them (tests pin a recorded selection with it).
        self.pinned: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def prepare(self, model: nn.Module) -> None:
        if self.heads is None:
            self.heads = find_calibration_heads(model, alpha=self.alpha, beta=self.beta)
            self._by_layer = _parse(self.heads)

    def find_sinks(self, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, heads: torch.Tensor, scale: float):
        """Sink columns ``(b, h, max_sinks)`` long and validity, from the last ``probe`` queries of ``q``."""
        tq, tk = q.shape[2], k.shape[2]
        p_n = min(self.probe, tq)
        g = q.shape[1] // k.shape[1]
        qp = q[:, heads, tq - p_n:].float()
        kk = k.index_select(1, heads // g).float()
        pos = torch.arange(tq - p_n, tq, device=q.device) + (tk - tq)
        s = qp @ kk.transpose(-1, -2) * scale - lse[:, heads, tq - p_n:, None]  # (b, h, probe, tk)
        causal = torch.arange(tk, device=q.device)[None, :] <= pos[:, None]
        col = torch.where(causal, s.exp(), torch.zeros_like(s)).mean(2)
        col[..., 0] = 0.0  # the initial sink is the model's own; ACT only damps the hidden ones
        n = min(self.max_sinks, tk)
        top = torch.topk(col, n, dim=-1)
        ok = top.values > self.alpha / tk
        return top.indices, ok

    def select(self, call: AttnCall) -> Selection:
        if self.heads is None:
            raise BadInputError("act needs the heads to calibrate: apply it with seqtool.patches.act.apply_act(model, "
                                "...) or pass heads=layer.q_head,... (see find_calibration_heads)")
        b, hq, tq, _ = call.q.shape
        heads = torch.tensor(self._by_layer.get(call.layer_idx, []), dtype=torch.long, device=call.q.device)
        if heads.numel() and int(heads.max()) >= hq:
            raise BadInputError(f"act head {call.layer_idx}.{int(heads.max())} out of range ({hq} query heads)")
        sinks = ok = None
        key = ("act", call.key_offset)
        if call.layer_idx in self.pinned:
            sinks, ok = self.pinned[call.layer_idx]
        elif call.cache is not None and key in call.cache.state:
            sinks, ok = call.cache.state[key]

        def finder(q, k, lse):
            found = self.find_sinks(q, k, lse, heads, call.scale)
            if call.cache is not None:
                call.cache.state[key] = found
            return found

        return ActSelection(b, hq, tq, call.tk, heads, sinks, ok, self.beta, self.block, finder)

    def make_cache_layer(self, runtime: Any) -> SeqtoolCacheLayer:
        return SeqtoolCacheLayer(runtime)  # the prompt's sink columns live in ``state``


def copy_task_loss(model: nn.Module, ids: torch.Tensor) -> float:
    """Mean next-token loss on the second half of ``ids`` (a sequence repeated twice, after an optional BOS)."""
    with torch.no_grad():
        logits = model(ids).logits.float()
    half = (ids.shape[1] - 1) // 2
    start = ids.shape[1] - half
    pred = logits[:, start - 1 : -1]
    return float(torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, start:].reshape(-1)))


def find_calibration_heads(model: nn.Module, *, alpha: float = 5.0, beta: float = 0.4, length: int = 48,
                           batch: int = 2, seed: int = 0, max_heads: int | None = None) -> tuple[str, ...]:
    """Heads that lower the copy-task loss when calibrated alone (``layer.q_head``), best first up to ``max_heads``."""
    from seqtool.arch.registry import head_counts
    from seqtool.patches._probe import copy_probe_ids
    from seqtool.patches.runtime import apply_patch, get_handle

    if get_handle(model) is not None:
        raise BadInputError("find the act heads on the unpatched model (handle.remove() first)")
    cfg = model.config
    bos = getattr(cfg, "bos_token_id", None)
    ids = copy_probe_ids(cfg.vocab_size, length, batch, seed, bos if isinstance(bos, int) else None)
    base = copy_task_loss(model, ids)
    n_heads, _, _ = head_counts(cfg)
    n_layers = cfg.num_hidden_layers
    gains = []
    for layer in range(n_layers):
        for head in range(n_heads):
            handle = apply_patch(model, "act", heads=(f"{layer}.{head}",), alpha=alpha, beta=beta)
            try:
                loss = copy_task_loss(model, ids)
            finally:
                handle.remove()
            if loss < base:
                gains.append((base - loss, f"{layer}.{head}"))
    gains.sort(reverse=True)
    chosen = [h for _, h in gains[: max_heads or len(gains)]]
    return tuple(sorted(chosen, key=lambda h: tuple(int(x) for x in h.split("."))))


def apply_act(model: nn.Module, **options: Any):
    """``apply_patch(model, "act", ...)`` after searching the heads to calibrate on the unpatched model."""
    from seqtool.patches.runtime import apply_patch, get_handle

    if options.get("heads") is None:
        previous = get_handle(model)
        if previous is not None:
            previous.remove()
        options["heads"] = find_calibration_heads(model, alpha=float(options.get("alpha", 5.0)),
                                                  beta=float(options.get("beta", 0.4)))
    return apply_patch(model, "act", **options)
