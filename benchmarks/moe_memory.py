"""Peak memory of `seqtool convert --to moe` (streamed tensor by tensor) against the size of what it writes.

Steps (each in its own process, so each peak RSS is that step's own):
1. save the `llama-3.2-1b` preset (random weights, real shapes) to disk in bf16 (skipped when already there);
2. `seqtool convert SEED --to moe --experts 4 -o OUT` — peak RSS of that process (ru_maxrss of the child);
3. for scale: the peak RSS of a process that only imports torch + transformers + seqtool.

Run niced; it writes ~7 GB under --workdir and removes the output afterwards unless --keep:
    nice -n 10 python benchmarks/moe_memory.py --workdir /tmp/moe-bench
Results: benchmarks/results/moe_memory.json (and .md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def run_child(args: list[str], log: Path) -> tuple[int, float]:
    """Run ``python ARGS``; returns (that child's own peak RSS in bytes, from wait4, and seconds)."""
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as handle:
        proc = subprocess.Popen([sys.executable, *args], env=env, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(log.read_text()[-3000:])
    return usage.ru_maxrss * 1024, time.perf_counter() - started


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/seqtool-moe-bench")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    seed, out = work / "llama-3.2-1b-bf16", work / f"moe-{args.experts}"
    baseline, _ = run_child(["-c", "import torch, transformers, seqtool.convert.moe, seqtool.models"],
                            work / "imports.log")
    if not (seed / "config.json").exists():
        save = ("import seqtool; from seqtool.arch.io import load_model, save_model; "
                f"m = load_model('llama-3.2-1b', dtype='bf16', device='cpu'); save_model(m.model, m.tokenizer, '{seed}')")
        run_child(["-c", save], work / "save.log")
    shutil.rmtree(out, ignore_errors=True)
    peak, seconds = run_child(["-m", "seqtool", "convert", str(seed), "--to", "moe", "--experts",
                               str(args.experts), "-o", str(out), "--json"], work / "convert.log")
    seed_bytes, out_bytes = dir_bytes(seed), dir_bytes(out)
    result = {
        "command": f"seqtool convert {seed.name} --to moe --experts {args.experts} -o {out.name}",
        "seed": "llama-3.2-1b preset (random weights), bf16", "experts": args.experts,
        "seed_bytes": seed_bytes, "output_bytes": out_bytes, "peak_rss_bytes": int(peak),
        "import_only_rss_bytes": int(baseline), "peak_over_output": round(peak / out_bytes, 4),
        "peak_minus_imports_over_output": round((peak - baseline) / out_bytes, 4), "seconds": round(seconds, 1),
        "cpu_threads": 1,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "moe_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    gib = 1024 ** 3
    (RESULTS / "moe_memory.md").write_text(
        "| seed (bf16) | experts | output | peak RSS | RSS of imports alone | peak / output | time |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {seed_bytes / gib:.2f} GiB | {args.experts} | {out_bytes / gib:.2f} GiB | {peak / gib:.2f} GiB | "
        f"{baseline / gib:.2f} GiB | {peak / out_bytes:.3f} | {seconds:.0f} s |\n")
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
