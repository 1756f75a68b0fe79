"""Routing balance of MoE / BAM models: how a prefill's tokens spread over each router's experts.

For a top-k router, an expert's share is the fraction of the top-k assignments it receives; for a soft router
(BAM attention experts, all mixed), its mean routing probability. ``imbalance`` = experts × the largest share:
1.0 when every expert gets the same share, ``experts`` when one expert gets everything.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

from seqtool.arch.registry import router_modules


@dataclass
class RouterBalance:
    """One router's load over a prefill: ``shares`` per expert (sum 1) and ``imbalance`` (see module doc)."""

    router: str
    top_k: int
    shares: list[float]
    imbalance: float


def expert_shares(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """(E,) share per expert for router ``logits`` (tokens, E): top-k assignment counts, or mean probabilities."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    if top_k:
        counts = torch.bincount(logits.topk(top_k, dim=-1).indices.flatten(), minlength=logits.shape[-1])
        return counts.float() / counts.sum().clamp(min=1)
    return torch.softmax(logits, dim=-1).mean(0)


@contextmanager
def record_routing(model: nn.Module) -> Iterator[list[RouterBalance]]:
    """Hooks on every router while the block runs; the yielded list is filled (one entry per router, summed over
    every forward inside the block) when it exits. Empty for a model without routers."""
    routers = router_modules(model)
    totals: dict[str, torch.Tensor] = {}

    def hook(name: str, top_k: int):
        def record(module, args, output):
            logits = output[0] if isinstance(output, tuple) else output
            shares = expert_shares(logits.detach(), top_k) * logits[..., 0].numel()
            totals[name] = totals.get(name, 0) + shares.cpu()
        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name, k)) for name, k in routers]
    result: list[RouterBalance] = []
    try:
        yield result
    finally:
        for handle in handles:
            handle.remove()
    for name, top_k in routers:
        if name in totals:
            shares = totals[name] / totals[name].sum()
            result.append(RouterBalance(name, top_k, [round(float(x), 4) for x in shares],
                                        round(float(shares.max() * len(shares)), 4)))
