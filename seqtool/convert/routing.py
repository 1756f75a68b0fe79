"""Router initialisation for upcycled experts: random, or from each seed's mean hidden states ("hidden").

"hidden" follows mergekit-moe's idea: run every seed on its own data, average the (unit-normalised) input of each
layer's MLP over tokens, and use that mean as the router row of the seed's expert, so tokens that look like a
seed's data score highest on its expert.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from seqtool.arch.registry import decoder_layers, get_family
from seqtool.errors import BadInputError

ROUTERS = ("random", "hidden")


def random_router(layers: int, experts: int, hidden: int, *, std: float, seed: int) -> list[torch.Tensor]:
    """Per layer a (experts, hidden) fp32 router drawn from N(0, std²) with a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(experts, hidden, generator=gen) * std for _ in range(layers)]


@torch.no_grad()
def mean_mlp_inputs(model, ids: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """(layers, hidden) mean over tokens of each layer's unit-normalised MLP input; ``ids`` is (samples, T)."""
    spec = get_family(model)
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), model.config.hidden_size)
    count = [0]

    def hook(idx):
        def record(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[idx] += F.normalize(x, dim=-1).sum(0)
            if idx == 0:
                count[0] += x.shape[0]
        return record

    handles = [getattr(layer, spec.mlp).register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        from seqtool.arch.offload import input_device
        device = input_device(model)
        for start in range(0, ids.shape[0], batch_size):
            model(ids[start:start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
    return sums / max(count[0], 1)


def hidden_router(seed_means: list[torch.Tensor], experts: int, *, scale: float = 1.0) -> list[torch.Tensor]:
    """Per layer a (experts, hidden) router whose row e is seed (e % seeds)'s unit-normalised mean MLP input,
    times ``scale``. ``seed_means``: one (layers, hidden) tensor per seed."""
    if not seed_means:
        raise BadInputError("the hidden router needs at least one seed")
    rows = [F.normalize(seed_means[e % len(seed_means)], dim=-1) * scale for e in range(experts)]
    stacked = torch.stack(rows, dim=1)  # (layers, experts, hidden)
    return list(stacked.unbind(0))
