"""Patch performance on CPU (or CUDA, where the kernel ops run Triton): ratios side by side in one run.

1. Prefill attention, 16k tokens, 8 heads, head_dim 64, budget 0.1 (90 % sparsity requested; the measured kept
   fraction is printed): vertical_slash and block_topk (selection + kernel) vs torch SDPA causal.
2. Decode attention at 16k context, per token: block_topk (Quest pages, bounds cached) vs dense decode_attn.
3. End to end: prefill of preset llama-3.2-1b (random weights, fp32 on CPU) at 8k, one repeat,
   block_topk budget 0.1 vs dense (SDPA), last logits only.

Run: python benchmarks/patches.py [--quick] [--threads N] [--out benchmarks/results/patches-cpu.md]

Baselines and candidates alternate inside each round (best of the rounds), so a change in machine load hits
both. On CPU the default is one torch thread (as benchmarks/kernels.py): the machine this runs on shares its
two cores with a higher-priority job, and a second thread that keeps losing its core stalls every parallel op
at its barrier, which measures the neighbour rather than the code. Both wall time and the thread's CPU time are
reported (with one thread, CPU time is the compute itself, unaffected by preemption).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import torch.nn.functional as F

from seqtool.patches import apply_patch, get_method
from seqtool.patches.base import AttnCall
from seqtool.patches.cache import SeqtoolCacheLayer
from seqtool.patches.selection import causal_pairs


def _rounds(fns: dict, repeats: int, inner: int = 1) -> dict:
    """Best (wall s, cpu s) per call of each fn over `repeats` rounds; fns alternate inside every round."""
    for fn in fns.values():  # warm-up
        fn()
    best = {name: (float("inf"), float("inf")) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(inner):
                fn()
            wall, cpu = (time.perf_counter() - w0) / inner, (time.thread_time() - c0) / inner
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def _row(bench, variant, t, kept, sec, base, unit="s"):
    scale, fmt = (1e3, ".2f") if unit == "ms" else (1.0, ".3f")
    return (bench, variant, t, kept, f"{sec[0] * scale:{fmt}} {unit}", f"{sec[0] / base[0]:.2f}",
            f"{sec[1] * scale:{fmt}} {unit}", f"{sec[1] / base[1]:.2f}")


def prefill_attention(t: int, repeats: int) -> list[tuple]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, t, 64) for _ in range(3))
    scale = 64 ** -0.5
    fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    kept = {}
    # (label, method, options): the defaults (vertical_slash: 128-token blocks at this length), plus
    # vertical_slash with MInference's 64-token blocks for comparison
    variants = [("block_topk budget=0.1", "block_topk", {}), ("vertical_slash budget=0.1", "vertical_slash", {}),
                ("vertical_slash budget=0.1 block=64", "vertical_slash", {"block": 64})]
    for label, name, extra in variants:
        method = get_method(name)(budget=0.1, min_len=0, **extra)
        call = AttnCall(q, k, v, scale, 0, torch.arange(1), 0)

        def run(method=method, call=call, label=label):  # selection + sparse compute + stats, as a patched layer runs
            sel = method.select(call)
            kept[label] = float(sel.kept_pairs().sum()) / (causal_pairs(t, t) * 8)
            return sel.attend(q, k, v, scale)

        fns[label] = run
    with torch.no_grad():
        best = _rounds(fns, repeats)
    rows = [_row("prefill attention", "sdpa causal", t, "1.000", best["sdpa"], best["sdpa"])]
    for label, _, _ in variants:
        rows.append(_row("prefill attention", label, t, f"{kept[label]:.3f}", best[label], best["sdpa"]))
    return rows


def decode_attention(t: int, steps: int, repeats: int) -> list[tuple]:
    from seqtool.kernels import decode_attn

    torch.manual_seed(0)
    q = torch.randn(1, 32, 1, 64)
    k, v = torch.randn(1, 8, t, 64), torch.randn(1, 8, t, 64)
    scale = 64 ** -0.5
    method = get_method("block_topk")(budget=0.1, min_len=0)
    cache = SeqtoolCacheLayer()
    call = AttnCall(q, k, v, scale, 0, torch.arange(1), 0, cache)
    holder = {}

    def step():  # Quest selection (page bounds cached in the layer after the first step) + paged decode
        sel = method.select_decode(call)
        holder["kept"] = float(sel.kept_pairs().sum()) / (t * 32)
        return sel.attend(q, k, v, scale)

    fns = {"decode_attn": lambda: decode_attn(q, k, v, scale=scale),
           "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True),
           "quest": step}
    with torch.no_grad():
        best = _rounds(fns, repeats, inner=steps)
    base = best["decode_attn"]
    return [_row("decode attention / token", "dense decode_attn (32 q heads, 8 kv)", t, "1.000", base, base, "ms"),
            _row("decode attention / token", "dense sdpa gqa (the `dense` method)", t, "1.000", best["sdpa"], base,
                 "ms"),
            _row("decode attention / token", "block_topk (Quest) budget=0.1", t, f"{holder['kept']:.3f}",
                 best["quest"], base, "ms")]


def end_to_end(t: int) -> list[tuple]:
    from seqtool.zoo.presets import build_preset

    model, _ = build_preset("llama-3.2-1b", dtype=torch.float32)
    ids = torch.randint(3, 1000, (1, t))

    def once():
        w0, c0 = time.perf_counter(), time.thread_time()
        model(ids, logits_to_keep=1)
        return time.perf_counter() - w0, time.thread_time() - c0

    with torch.no_grad():
        dense = once()
        handle = apply_patch(model, "block_topk", budget=0.1, min_len=0)
        sparse = once()
        kept = handle.kept_fraction()
        handle.remove()
    return [_row("end-to-end prefill", "llama-3.2-1b dense (sdpa)", t, "1.000", dense, dense),
            _row("end-to-end prefill", "llama-3.2-1b block_topk budget=0.1", t, f"{kept:.3f}", sparse, dense)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4k attention, 4k decode, 1k end-to-end (smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see the docstring)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds for the attention benchmarks")
    parser.add_argument("--out", default="benchmarks/results/patches-cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load0 = " ".join(f"{x:.1f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    t_attn, t_e2e = (4096, 1024) if args.quick else (16384, 8192)
    rows = prefill_attention(t_attn, repeats=args.repeats)
    rows += decode_attention(t_attn, steps=20, repeats=args.repeats)
    rows += end_to_end(t_e2e)
    from tabulate import tabulate

    table = tabulate(rows, headers=["benchmark", "variant", "tokens", "kept (measured)", "wall", "ratio (wall)",
                                    "cpu", "ratio (cpu)"], tablefmt="github", disable_numparse=True)
    header = (f"# Patch benchmarks ({'quick' if args.quick else 'full'})\n\n"
              f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
              f"{torch.__version__}, {torch.get_num_threads()} torch thread(s), device cpu, fp32, min_len=0. "
              f"Load average at start {load0}, at end {' '.join(f'{x:.1f}' for x in os.getloadavg())}; "
              f"run took {time.perf_counter() - t0:.0f} s.\n\n"
              f"Prefill attention: best of {args.repeats} rounds, each round runs SDPA and both methods back to "
              f"back (selection + sparse compute). Decode: per token, mean of 20 calls, best of {args.repeats} "
              f"rounds; ratios against the dense decode_attn (the faster dense baseline). End to end: one "
              f"forward each. 'wall' is elapsed time, 'cpu' the CPU time of the main thread (all the compute with one "
              f"thread; preemption by other jobs does not inflate it). 'kept' is the measured fraction of causal key "
              f"positions computed.\n\n")
    text = header + table + "\n"
    print(text)
    with open(args.out, "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
