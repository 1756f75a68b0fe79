"""KV-cache size, measured from the cache's real tensors and predicted analytically.

Measuring the tensors (rather than multiplying shapes) means a cache-evicting or compressing patch, whose
cache layers hold fewer or smaller tensors, shows its savings here.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from seqtool.arch.registry import kv_cache_bytes_per_token


def _tensors(obj: Any, depth: int = 0) -> Iterable[torch.Tensor]:
    """Tensors held by a cache layer: its attributes and containers (lists, tuples, dicts) under them.

    Other objects a layer points to (a patch runtime, the method, the model) are not cache memory and are
    not followed.
    """
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 4:
        return
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item, depth + 1)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item, depth + 1)
    elif depth == 0 and hasattr(obj, "__dict__"):
        for item in vars(obj).values():
            yield from _tensors(item, depth + 1)


def cache_tensors(cache: Any) -> list[torch.Tensor]:
    """Every distinct tensor a cache holds: its per-layer state (``cache.layers``) or a legacy tuple of (k, v)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        found = (t for layer in layers for t in _tensors(layer))
    else:  # legacy tuple of (keys, values) per layer
        found = _tensors(list(cache), depth=1)
    seen, unique = set(), []
    for t in found:
        if t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            unique.append(t)
    return unique


def cache_bytes(cache: Any) -> int:
    """Bytes held by the cache's tensors (keys, values and any per-layer state a patch keeps)."""
    return sum(t.numel() * t.element_size() for t in cache_tensors(cache))


def analytic_kv_bytes(config: Any, *, tokens: int, batch: int, bytes_per_element: int) -> int:
    """Dense KV cache: layers × 2 × kv_heads × head_dim × tokens × batch × bytes."""
    return kv_cache_bytes_per_token(config, bytes_per_element) * tokens * batch
