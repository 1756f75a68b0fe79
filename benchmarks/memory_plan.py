"""Predicted (``seqtool.plan``, meta tensors, no weights) vs measured peak memory of recipe steps.

    nice -n 10 python benchmarks/memory_plan.py                      # llama-3.2-1b, bf16, random weights
    python benchmarks/memory_plan.py --render-only                   # rebuild the table from the cache
    nice -n 10 python benchmarks/memory_plan.py --model ref --steps ref --default-malloc \
        --cache benchmarks/results/memory_plan_ref.json --marker memory-plan-ref

Each step is measured in a fresh process (:func:`seqtool.plan.measure.measure_peak`: peak-RSS increase over the
process after a warm-up run of the same step on ``tiny-llama``), one torch thread; measured rows are cached in
``--cache`` (JSON) as soon as they are done, so a rerun only measures what is missing and recomputes every
prediction. The table goes to docs/memory_plan.md between the ``memory-plan`` markers. The bar (issue 19): a
prediction within 20 % or 16 MiB of the measured peak, whichever is larger.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Short lengths so the whole benchmark takes minutes on one CPU thread.
STEPS: list[tuple[str, dict]] = [
    ("inspect", {}),
    ("profile", {"seq_len": 512, "decode_tokens": 4, "warmup": 0, "repeats": 1}),
    ("eval", {"task": "ppl", "seq_len": 512, "ppl_tokens": 1024}),
    ("prune", {"ratio": 0.2, "samples": 8, "seq_len": 128}),
    ("convert", {"to": "gqa", "kv_heads": 4}),
    ("finetune", {"method": "lora", "steps": 2, "batch": 1, "seq_len": 128, "eval_rows": 1}),
    # long enough that the training step, not the checkpoint validation, is the peak
    ("finetune", {"method": "lora", "steps": 1, "batch": 1, "seq_len": 768, "eval_rows": 1}),
]


WARMUPS: dict[str, dict] = {}  # step key -> cheaper options for the tiny-llama warm-up (default: the step's own)


def within_bar(predicted: int, measured: int) -> bool:
    return abs(predicted - measured) <= max(0.2 * measured, 16 * 2**20)


def key_of(model: str, dtype: str, command: str, options: dict) -> str:
    return json.dumps([model, dtype, command, options], sort_keys=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--dtype", default="bf16", help="bf16 | fp32 | auto (each command's default)")
    p.add_argument("--cache", default=str(ROOT / "benchmarks/results/memory_plan.json"))
    p.add_argument("--doc", default=str(ROOT / "docs/memory_plan.md"))
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--remeasure", action="store_true", help="measure every step again")
    p.add_argument("--steps", choices=("default", "ref"), default="default",
                   help="default: the short 1B steps below; ref: the steps tests/plan checks on ref")
    p.add_argument("--marker", default="memory-plan", help="the doc's table sits between <!-- MARKER:begin/end -->")
    p.add_argument("--default-malloc", action="store_true",
                   help="also measure with glibc's default (adaptive) mmap threshold: an extra column")
    args = p.parse_args()
    if args.steps == "ref":
        from seqtool.plan.measure import REF_EXTRA_STEPS, REF_STEPS

        STEPS[:] = [(c, o) for c, o, _ in REF_STEPS + REF_EXTRA_STEPS]
        WARMUPS.update({key_of(args.model, args.dtype, c, o): w for c, o, w in REF_STEPS + REF_EXTRA_STEPS})

    cache_path = Path(args.cache)
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {"rows": {}}
    if not args.render_only:
        from seqtool.plan.measure import measure_peak

        for command, options in STEPS:
            key = key_of(args.model, args.dtype, command, options)
            if key in cache["rows"] and not args.remeasure:
                continue
            started = time.time()
            warm = WARMUPS.get(key)
            reading = measure_peak(args.model, command, options, dtype=args.dtype, warmup_options=warm)
            cache["rows"][key] = {"model": args.model, "dtype": args.dtype, "command": command, "options": options,
                                  "measured_bytes": reading["peak_bytes"], "method": reading["method"],
                                  "seconds": round(time.time() - started, 1)}
            if args.default_malloc:
                default = measure_peak(args.model, command, options, dtype=args.dtype, fixed_mmap=False,
                                       warmup_options=warm)
                cache["rows"][key]["measured_default_malloc_bytes"] = default["peak_bytes"]
            cache["machine"] = {"platform": platform.platform(), "threads": 1}
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_text(json.dumps(cache, indent=2) + "\n")
            print(f"{command}: measured {reading['peak_bytes'] / 2**20:.1f} MiB "
                  f"({time.time() - started:.0f} s)", flush=True)
    table = render(cache, args.model, args.dtype)
    print(table)
    doc = Path(args.doc)
    begin, end = f"<!-- {args.marker}:begin -->", f"<!-- {args.marker}:end -->"
    if doc.exists() and begin in doc.read_text():
        text = doc.read_text()
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        doc.write_text(f"{head}{begin}\n{table}\n{end}{tail}")


def render(cache: dict, model: str, dtype: str) -> str:
    from seqtool.plan import plan_recipe

    default = any("measured_default_malloc_bytes" in r for r in cache["rows"].values())
    extra_head = " measured, default malloc |" if default else ""
    lines = [f"| step | options | predicted peak | measured peak |{extra_head} error | within bar | largest predicted parts (MiB) |",
             "|---|---|---|---|---|---|---|" + ("---|" if default else "")]
    for command, options in STEPS:
        row = cache["rows"].get(key_of(model, dtype, command, options))
        plan = plan_recipe(model, [(command, options)], dtype=dtype).steps[0]
        predicted = plan.peak_bytes
        parts = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in sorted(plan.peak_parts.items(), key=lambda kv: -kv[1])[:3])
        opts = " ".join(f"{k}={v}" for k, v in options.items()) or "-"
        if row is None:
            lines.append(f"| {command} | {opts} | {predicted / 2**20:.1f} MiB | (not measured) |{' |' if default else ''} | | {parts} |")
            continue
        measured = row["measured_bytes"]
        err = f"{(predicted - measured) / 2**20:+.1f} MiB ({(predicted - measured) / measured:+.1%})"
        ok = "yes" if within_bar(predicted, measured) else "**no**"
        extra = ""
        if default:
            d = row.get("measured_default_malloc_bytes")
            extra = f" {d / 2**20:.1f} MiB |" if d is not None else " |"
        lines.append(f"| {command} | {opts} | {predicted / 2**20:.1f} MiB | {measured / 2**20:.1f} MiB |{extra} "
                      f"{err} | {ok} | {parts} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
