"""Offline probes on synthetic inputs: induction (copy) scores per head.

Used by RazorAttention (retrieval heads, ``patches``) and by ``convert --to hybrid`` (which layers stay attention);
it lives on the ``arch`` floor so both can import it.

The probe is a random token sequence repeated twice. At the second copy, query ``L + i`` holds the same token as
position ``i``; an induction head attends to ``i + 1`` (the token that followed the earlier occurrence), which is
how a model retrieves from far context. Attention weights come from the model's own eager attention.
"""
from __future__ import annotations

import torch
from torch import nn


def copy_probe_ids(vocab_size: int, length: int, batch: int, seed: int, bos: int | None) -> torch.Tensor:
    """``(batch, 2 * length [+ 1])`` random tokens repeated twice (after a BOS token when the model has one)."""
    gen = torch.Generator().manual_seed(seed)
    low = 3 if vocab_size > 8 else 0
    half = torch.randint(low, vocab_size, (batch, length), generator=gen)
    ids = torch.cat([half, half], 1)
    if bos is not None:
        ids = torch.cat([torch.full((batch, 1), bos, dtype=ids.dtype), ids], 1)
    return ids


def attention_maps(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer ``(B, Hq, T, T)`` fp32 attention probabilities of ``model`` on ``ids`` (eager attention)."""
    previous = model.config._attn_implementation
    from seqtool.arch.offload import input_device
    device = input_device(model)
    try:
        model.set_attn_implementation("eager")
        with torch.no_grad():
            out = model(ids.to(device), output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return [a.float().cpu() for a in out.attentions]


def induction_scores(model: nn.Module, *, length: int = 64, batch: int = 4, seed: int = 0) -> torch.Tensor:
    """``(n_layers, Hq)``: mean attention that second-copy queries give to the token after the earlier occurrence."""
    cfg = model.config
    bos = getattr(cfg, "bos_token_id", None)
    ids = copy_probe_ids(cfg.vocab_size, length, batch, seed, bos if isinstance(bos, int) else None)
    off = ids.shape[1] - 2 * length  # 1 with a BOS token
    i = torch.arange(length - 1)
    q_pos = off + length + i
    k_pos = off + i + 1
    scores = []
    for att in attention_maps(model, ids):
        scores.append(att[:, :, q_pos, k_pos].mean((0, 2)))
    return torch.stack(scores)
