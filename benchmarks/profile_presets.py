"""Profile the real-shape presets (random weights) over long prompts and write the results.

Default: every real-shape preset at 8k, 16k and 32k tokens on the GPU in bf16, 32 decode tokens, 3 repeats.
Writes ``benchmarks/results/profile-<device>.json`` (every report, with its environment) and ``.md`` (tables).
Runs on any CUDA machine; ``--device cpu`` with small sizes checks it without one, e.g.::

    python benchmarks/profile_presets.py                       # GPU: 8k-32k, all real-shape presets
    python benchmarks/profile_presets.py --device cpu --presets llama-3.2-1b --sweep 1k --decode-tokens 4 --repeats 1
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

import seqtool
from seqtool.cli.common import to_jsonable
from seqtool.profile.report import fmt_flops, fmt_len, fmt_rate, fmt_seconds, fmt_tflops
from seqtool.utils import format_bytes
from seqtool.zoo.presets import REAL_SHAPE_PRESETS

RESULTS = Path(__file__).parent / "results"


def device_slug(report) -> str:
    env = report.environment
    name = env.device_name if env.device_type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def markdown_table(model) -> str:
    from tabulate import tabulate

    rows = []
    for r in model.rows:
        if r.status != "ok":
            rows.append([fmt_len(r.seq_len), r.status.upper(), *["-"] * 7, r.note])
            continue
        rows.append([fmt_len(r.seq_len), fmt_seconds(r.prefill_median_s), fmt_seconds(r.prefill_p90_s),
                     fmt_seconds(r.decode_s_per_token), fmt_rate(r.decode_tokens_per_s),
                     format_bytes(r.peak_memory_bytes), format_bytes(r.kv_cache_bytes), fmt_flops(r.prefill_flops),
                     fmt_tflops(r.prefill_tflops), r.note])
    headers = ["seq_len", "prefill p50", "prefill p90", "decode/token", "decode tok/s", "peak memory", "KV cache",
               "prefill FLOPs", "TFLOP/s", "note"]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def breakdown_table(model) -> str | None:
    from tabulate import tabulate

    rows = [[fmt_len(r.seq_len)] + [f"{100 * r.breakdown_s[k] / r.breakdown_s['total']:.0f}%"
                                    for k in ("attention", "mlp", "norms", "lm_head", "other")]
            for r in model.rows if r.breakdown_s and r.breakdown_s.get("total")]
    if not rows:
        return None
    return tabulate(rows, headers=["seq_len", "attention", "MLP", "norms", "lm_head", "other"], tablefmt="github")


def write_markdown(reports, path: Path, command: str, seconds: float) -> None:
    env = reports[0].environment
    s = reports[0].settings
    memory = "CUDA max allocated" if env.device_type == "cuda" else "peak RSS increase (one process per length)"
    lines = [
        f"# seqtool profile: real-shape presets on {env.device_name}", "",
        f"Command: `{command}` ({seconds / 60:.1f} min)", "",
        f"- device: {env.device_name} ({env.device_type}), torch {env.torch_version}, transformers "
        f"{env.transformers_version}, CUDA {env.cuda_version}, {env.threads} CPU threads",
        f"- batch {s['batch']}, {s['decode_tokens']} decode tokens with a KV cache, {s['repeats']} timed prefills "
        f"after {s['warmup']} warmup; random weights (seed 0); peak memory = {memory}",
        "- prefill FLOPs = 2·(decoder matmul params)·tokens + lm_head at the last position + causal attention "
        "2·B·H·T²·D per layer (FlashAttention's count); TFLOP/s = FLOPs / prefill p50", "",
    ]
    for report in reports:
        model = report.models[0]
        lines += [f"## {model.source}", "",
                  f"{model.family}, {model.params / 1e9:.2f}B params, {model.dtype}, weights "
                  f"{format_bytes(model.weight_bytes)}, attention {model.attn}", "", markdown_table(model), ""]
        parts = breakdown_table(model)
        if parts:
            lines += ["Prefill time by module kind:", "", parts, ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(REAL_SHAPE_PRESETS), help="comma-separated preset names")
    parser.add_argument("--sweep", default="8k,16k,32k")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--attn", default=None, help="sdpa (default), eager or a seqtool patch spec")
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    command = "python benchmarks/profile_presets.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    start = time.perf_counter()
    reports = []
    for name in [p for p in args.presets.split(",") if p]:
        print(f"profiling {name} at {args.sweep} on {args.device} ...", file=sys.stderr, flush=True)
        report = seqtool.profile(name, sweep=args.sweep, batch=args.batch, decode_tokens=args.decode_tokens,
                                 dtype=args.dtype, device=args.device, warmup=args.warmup, repeats=args.repeats,
                                 attn=args.attn, breakdown=args.breakdown, threads=args.threads,
                                 progress=lambda src, row: print(f"  {src} @ {row.seq_len}: {row.status} "
                                                                 f"{fmt_seconds(row.prefill_median_s)}",
                                                                 file=sys.stderr, flush=True))
        reports.append(report)
    seconds = time.perf_counter() - start
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"profile-{device_slug(reports[0])}"
    stem.with_suffix(".json").write_text(json.dumps(
        {"command": command, "seconds": seconds, "reports": to_jsonable(reports)}, indent=2))
    write_markdown(reports, stem.with_suffix(".md"), command, seconds)
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
