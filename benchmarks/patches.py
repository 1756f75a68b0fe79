"""Patch performance on CPU (or CUDA, where the kernel ops run Triton): ratios side by side in one run.

1. Prefill attention, 16k tokens, 8 heads, head_dim 64, budget 0.1 (90 % sparsity requested; the measured kept
   fraction is printed): vertical_slash and block_topk (selection + kernel) vs torch SDPA causal.
2. Decode attention at 16k context, per token: block_topk (Quest pages, bounds cached) vs dense decode_attn.
3. End to end: prefill of preset llama-3.2-1b (random weights, fp32 on CPU) at 8k, one repeat,
   block_topk budget 0.1 vs dense (SDPA), last logits only.

Run: python benchmarks/patches.py [--quick] [--out benchmarks/results/patches-cpu.md]
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from seqtool.patches import apply_patch, get_method
from seqtool.patches.base import AttnCall
from seqtool.patches.cache import SeqtoolCacheLayer
from seqtool.patches.selection import causal_pairs


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def prefill_attention(t: int, repeats: int) -> list[tuple]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, t, 64) for _ in range(3))
    scale = 64 ** -0.5
    rows = []
    sdpa = _time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), repeats)
    rows.append(("prefill attention", f"sdpa causal", t, "1.000", f"{sdpa:.3f}", "1.00"))
    for name in ("block_topk", "vertical_slash"):
        method = get_method(name)(budget=0.1, min_len=0)
        call = AttnCall(q, k, v, scale, 0, torch.arange(1), 0)
        holder = {}

        def run():
            sel = method.select(call)
            holder["kept"] = float(sel.kept_pairs().sum()) / (causal_pairs(t, t) * 8)
            return sel.attend(q, k, v, scale)

        with torch.no_grad():
            sec = _time(run, repeats)
        rows.append(("prefill attention", f"{name} budget=0.1", t, f"{holder['kept']:.3f}", f"{sec:.3f}",
                     f"{sec / sdpa:.2f}"))
    return rows


def decode_attention(t: int, steps: int) -> list[tuple]:
    from seqtool.kernels import decode_attn

    torch.manual_seed(0)
    q = torch.randn(1, 32, 1, 64)
    k, v = torch.randn(1, 8, t, 64), torch.randn(1, 8, t, 64)
    scale = 64 ** -0.5
    dense = _time(lambda: [decode_attn(q, k, v, scale=scale) for _ in range(steps)], 1) / steps
    method = get_method("block_topk")(budget=0.1, min_len=0)
    cache = SeqtoolCacheLayer()
    call = AttnCall(q, k, v, scale, 0, torch.arange(1), 0, cache)
    holder = {}

    def step():
        sel = method.select_decode(call)  # page bounds come from the cache state after the first step
        holder["kept"] = float(sel.kept_pairs().sum()) / (t * 32)
        return sel.attend(q, k, v, scale)

    with torch.no_grad():
        quest = _time(lambda: [step() for _ in range(steps)], 1) / steps
    return [("decode attention / token", "dense decode_attn (32 q heads, 8 kv)", t, "1.000", f"{dense * 1e3:.2f} ms", "1.00"),
            ("decode attention / token", "block_topk (Quest) budget=0.1", t, f"{holder['kept']:.3f}",
             f"{quest * 1e3:.2f} ms", f"{quest / dense:.2f}")]


def end_to_end(t: int) -> list[tuple]:
    from seqtool.zoo.presets import build_preset

    model, _ = build_preset("llama-3.2-1b", dtype=torch.float32)
    ids = torch.randint(3, 1000, (1, t))
    rows = []
    with torch.no_grad():
        start = time.perf_counter()
        model(ids, logits_to_keep=1)
        dense = time.perf_counter() - start
        rows.append(("end-to-end prefill", "llama-3.2-1b dense (sdpa)", t, "1.000", f"{dense:.1f}", "1.00"))
        handle = apply_patch(model, "block_topk", budget=0.1, min_len=0)
        start = time.perf_counter()
        model(ids, logits_to_keep=1)
        sparse = time.perf_counter() - start
        rows.append(("end-to-end prefill", "llama-3.2-1b block_topk budget=0.1", t,
                     f"{handle.kept_fraction():.3f}", f"{sparse:.1f}", f"{sparse / dense:.2f}"))
        handle.remove()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4k attention, 4k decode, 1k end-to-end (smoke run)")
    parser.add_argument("--out", default="benchmarks/results/patches-cpu.md")
    args = parser.parse_args()
    t_attn, t_e2e = (4096, 1024) if args.quick else (16384, 8192)
    rows = prefill_attention(t_attn, repeats=1 if not args.quick else 2)
    rows += decode_attention(t_attn, steps=20)
    rows += end_to_end(t_e2e)
    from tabulate import tabulate

    table = tabulate(rows, headers=["benchmark", "variant", "tokens", "kept (measured)", "time (s)", "ratio"],
                     tablefmt="github", disable_numparse=True)
    header = (f"# Patch benchmarks ({'quick' if args.quick else 'full'})\n\n"
              f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, device cpu, fp32. min_len=0. Times are the best of the repeats "
              f"(prefill attention), the mean over 20 tokens (decode), one run (end to end). 'kept' is the "
              f"measured fraction of causal key positions computed.\n\n")
    text = header + table + "\n"
    print(text)
    with open(args.out, "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
