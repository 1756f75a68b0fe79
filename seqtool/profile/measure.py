"""Measure one model at one length in this process: prefill, first token, cached decode, memory, KV bytes."""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from transformers import DynamicCache

from seqtool.profile.kvcache import cache_bytes
from seqtool.profile.memory import PeakMemory
from seqtool.profile.timing import Stopwatch, TimingStats, decode_rate, time_decode, time_prefill

# Decode steps run during each warmup round, so the first timed decode step is not a cold one.
WARMUP_DECODE_STEPS = 2


def default_cache_factory() -> Callable[[Any], Any]:
    """``seqtool.patches.make_cache(model)`` when patches provide one (patched attention may keep its own
    cache state), else a plain ``DynamicCache``."""
    try:
        from seqtool.patches import make_cache  # type: ignore[attr-defined]
    except ImportError:
        make_cache = None

    def factory(model):
        cache = make_cache(model) if make_cache is not None else None
        return cache if cache is not None else DynamicCache(config=model.config)

    return factory


def _cache_kwarg(model) -> str:
    # transformers 5.2x renamed `past_key_values` to `cache`; the GPU machines run an older 5.x.
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _returned_cache(out, passed):
    """The cache the model returned (under its new or old output key), else the one passed in."""
    for key in ("cache", "past_key_values"):
        cache = out.get(key) if hasattr(out, "get") else None
        if cache is not None:
            return cache
    return passed


class Session:
    """Greedy generation state for one model: ``prefill(ids)`` builds a fresh cache, ``step()`` decodes one token."""

    def __init__(self, model, cache_factory: Callable[[Any], Any]):
        self.model = model
        self.cache_factory = cache_factory
        self.cache_kw = _cache_kwarg(model)
        self.cache = None
        self.token: torch.Tensor | None = None

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt (B, T) with a new cache; returns last-position logits (B, 1, V)."""
        self.cache = None  # drop the previous cache before allocating the next one
        cache = self.cache_factory(self.model)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self.cache_kw: cache})
        self.cache = _returned_cache(out, cache)
        return out.logits

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy token (B, 1) from logits (B, 1, V)."""
        self.token = logits[:, -1].argmax(-1, keepdim=True)
        return self.token

    def step(self) -> None:
        out = self.model(input_ids=self.token, use_cache=True, **{self.cache_kw: self.cache})
        self.cache = _returned_cache(out, self.cache)
        self.pick(out.logits)

    def release(self) -> None:
        self.cache = None
        self.token = None


def random_prompt(vocab: int, batch: int, seq_len: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # ids 3+ skip the usual pad/bos/eos ids
    return torch.randint(3, max(vocab, 4), (batch, seq_len), generator=generator).to(device)


def measure_length(model, *, seq_len: int, batch: int, decode_tokens: int, warmup: int, repeats: int,
                   breakdown: bool = False, clock: Callable[[], float] | None = None,
                   cache_factory: Callable[[Any], Any] | None = None) -> dict:
    """Measure ``model`` on a random ``batch × seq_len`` prompt; returns LengthResult fields as a dict.

    Memory covers warmup, timed prefills and decode (one cache alive at a time); KV bytes are summed from the
    cache after the prefill and after decoding; the breakdown (optional) is a separate profiled prefill.
    """
    from seqtool.arch.offload import input_device
    device = input_device(model)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    watch = Stopwatch(clock, sync) if clock is not None else Stopwatch(sync=sync)
    session = Session(model, cache_factory or default_cache_factory())
    ids = random_prompt(int(model.config.vocab_size), batch, seq_len, device)
    meter = PeakMemory(device)
    with torch.inference_mode():
        meter.start()
        for _ in range(warmup):
            session.pick(session.prefill(ids))
            for _ in range(min(WARMUP_DECODE_STEPS, decode_tokens)):
                session.step()
        timing, _ = time_prefill(lambda: session.prefill(ids), session.pick, warmup=0, repeats=repeats, watch=watch)
        kv_prefill = cache_bytes(session.cache)
        steps = time_decode(session.step, decode_tokens, watch=watch)
        kv_final = cache_bytes(session.cache)
        peak = meter.stop()
        session.release()
        routing = []
        if _has_routers(model):  # MoE / BAM: one more prefill (untimed) with hooks on the routers
            from seqtool.profile.routing import record_routing

            with record_routing(model) as routing:
                session.pick(session.prefill(ids))
            session.release()
        parts = None
        if breakdown:
            from seqtool.profile.breakdown import profile_breakdown

            parts = profile_breakdown(model, lambda: session.pick(session.prefill(ids)), device)
            session.release()
    prefill = TimingStats.of(timing.prefill)
    per_token, rate = decode_rate(steps, batch)
    return dict(
        seq_len=seq_len, batch=batch, prefill_median_s=prefill.median, prefill_p90_s=prefill.p90,
        prefill_samples_s=list(timing.prefill), ttft_s=TimingStats.of(timing.ttft).median,
        decode_tokens=decode_tokens, decode_s_per_token=per_token if steps else None,
        decode_tokens_per_s=rate if steps else None, peak_memory_bytes=peak.peak_bytes,
        peak_reserved_bytes=peak.reserved_bytes, peak_increase_bytes=peak.increase_bytes,
        memory_method=peak.method, kv_cache_bytes=kv_prefill, kv_cache_bytes_final=kv_final, breakdown_s=parts,
        routing=[{"router": b.router, "top_k": b.top_k, "shares": b.shares, "imbalance": b.imbalance}
                 for b in routing] or None,
    )


def _has_routers(model) -> bool:
    from seqtool.arch.registry import router_modules

    return bool(router_modules(model))
