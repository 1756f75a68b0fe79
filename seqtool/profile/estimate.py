"""Estimate the memory one profiled length needs, so a length that cannot fit is reported, not thrashed.

The estimate is deliberately simple (it is compared against free memory, not reported as a measurement):
weights + dense KV cache for ``seq_len + decode_tokens`` tokens + the largest per-layer activation set of a
prefill (hidden states, q/k/v, MLP intermediates; eager attention adds the T×T scores and their fp32 softmax).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from seqtool.arch.registry import config_value, head_counts, kv_cache_bytes_per_token

# Python + torch + transformers in a fresh measurement process, before any weights.
CPU_RUNTIME_OVERHEAD = 600 * 1024**2


@dataclass
class MemoryEstimate:
    weights: int
    kv_cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations


def estimate_memory(config, *, weight_bytes: int, bytes_per_element: int, batch: int, seq_len: int,
                    decode_tokens: int, attn: str | None) -> MemoryEstimate:
    """Bytes a prefill of ``batch × seq_len`` plus ``decode_tokens`` cached decode steps needs."""
    logits = batch * int(config.vocab_size) * 4 * 2
    kv = kv_cache_bytes_per_token(config, bytes_per_element) * batch * (seq_len + decode_tokens)
    layer = layer_activation_bytes(config, batch=batch, seq_len=seq_len, bytes_per_element=bytes_per_element,
                                   attn=attn)
    return MemoryEstimate(weight_bytes, kv, layer + logits)


def layer_activation_bytes(config, *, batch: int, seq_len: int, bytes_per_element: int, attn: str | None) -> int:
    """The largest set of tensors one decoder layer holds at once in a no-grad forward of ``batch × seq_len``
    tokens: its attention phase (hidden states, q/k/v, outputs; eager attention adds the T×T scores and their
    fp32 softmax) or its MLP phase (hidden states and the gate/up/activation intermediates)."""
    heads, kv_heads, head_dim = head_counts(config)
    hidden = int(config_value(config, "hidden"))
    inter = int(config_value(config, "intermediate"))
    n = batch * seq_len
    b = bytes_per_element
    attention_phase = n * (4 * hidden + 3 * heads * head_dim + 4 * kv_heads * head_dim) * b
    if attn == "eager":
        # scores in the model dtype, softmax in fp32, probabilities cast back
        attention_phase += batch * heads * seq_len * seq_len * (2 * b + 4)
    mlp_phase = n * (3 * hidden + 4 * inter) * b
    return max(attention_phase, mlp_phase)


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, size: int = 512, repeats: int = 3) -> float:
    """This device's dense matmul rate (FLOP/s) in ``dtype``: best of a few ``size``³ products (~10 ms on CPU)."""
    import time

    device = torch.device(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first one warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / max(best, 1e-9)


def estimate_seconds(prefill_flops: int, params: int, *, batch: int, decode_tokens: int, warmup: int, repeats: int,
                     flops_per_s: float) -> float:
    """Seconds a profiled length should take: ``warmup + repeats`` prefills plus the decode steps (2 per warmup
    round and ``decode_tokens``), each decode step ~``2 · params · batch`` FLOPs. A model runs below the matmul
    rate, so this is a lower bound of the right order, for ``--max-seconds`` and the log line."""
    decode_steps = decode_tokens + 2 * warmup
    return ((warmup + repeats) * prefill_flops + decode_steps * 2 * params * batch) / flops_per_s


def available_bytes(device: torch.device) -> int:
    """Memory a new allocation can use now: free GPU memory, or the OS's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # blocks PyTorch caches but does not use are free for us, though not for the driver
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    import psutil

    return int(psutil.virtual_memory().available)


def fits(estimate: MemoryEstimate, available: int, *, weights_loaded: bool, overhead: int = 0) -> tuple[bool, int]:
    """(whether it fits, bytes still needed): weights already in memory are not counted again; ``overhead``
    is what a fresh measurement process needs besides (``CPU_RUNTIME_OVERHEAD`` for a CPU subprocess)."""
    needed = estimate.total - (estimate.weights if weights_loaded else 0) + overhead
    return needed <= available, needed
