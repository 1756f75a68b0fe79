"""CLI start-up time: ``--help`` and argument errors must answer in under a second (issue 18).

Each command runs ``--repeats`` times (median reported) beside ``python -c pass`` (the interpreter's floor) and
``python -c "import torch, transformers"`` (what a command that loads a model pays on top). Results go to
``benchmarks/results/startup.{json,md}``.

    python benchmarks/startup.py                # 5 repeats
    python benchmarks/startup.py --repeats 9
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BUDGET_S = 1.0
CASES = [
    ("python -c pass (floor)", [PY, "-c", "pass"], 0, None),
    ("seqtool --help", [PY, "-m", "seqtool", "--help"], 0, BUDGET_S),
    ("seqtool prune --help", [PY, "-m", "seqtool", "prune", "--help"], 0, BUDGET_S),
    ("typo'd model: seqtool inspect tiny-lama", [PY, "-m", "seqtool", "inspect", "tiny-lama"], 2, BUDGET_S),
    ("missing dir: seqtool eval fx/nope", [PY, "-m", "seqtool", "eval", "fx/nope"], 2, BUDGET_S),
    ("bad value: seqtool prune ref --ratio abc", [PY, "-m", "seqtool", "prune", "ref", "--ratio", "abc"], 2, BUDGET_S),
    ("in-place preset: seqtool prune tiny-llama --ratio 0.3 --in-place",
     [PY, "-m", "seqtool", "prune", "tiny-llama", "--ratio", "0.3", "--in-place"], 2, BUDGET_S),
    ("import torch, transformers (for scale)", [PY, "-c", "import torch, transformers"], 0, None),
]


def time_command(argv: list[str], expected_rc: int, repeats: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
        times.append(time.perf_counter() - start)
        if proc.returncode != expected_rc:
            raise SystemExit(f"{argv}: exit {proc.returncode}, expected {expected_rc}\n{proc.stderr}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "startup"))
    args = parser.parse_args()
    rows = []
    for name, argv, rc, budget in CASES:
        times = time_command(argv, rc, args.repeats)
        median = statistics.median(times)
        rows.append({"case": name, "median_s": round(median, 3), "min_s": round(min(times), 3),
                     "max_s": round(max(times), 3), "budget_s": budget,
                     "within_budget": None if budget is None else median < budget})
        print(f"{name:70s} median {median:.3f} s  (min {min(times):.3f}, max {max(times):.3f})", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    meta = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
            "load_average_1min": load, "repeats": args.repeats}
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# CLI start-up (median of %d runs)" % args.repeats, "",
             f"`python benchmarks/startup.py --repeats {args.repeats}` on {meta['platform']}, {meta['cpus']} CPUs, "
             f"1-min load average {load:.1f} at the end (the machine is shared).", "",
             "| case | median | min | max | budget |", "|---|---|---|---|---|"]
    for r in rows:
        budget = "-" if r["budget_s"] is None else f"< {r['budget_s']:g} s: {'yes' if r['within_budget'] else 'NO'}"
        lines.append(f"| {r['case']} | {r['median_s']:.3f} s | {r['min_s']:.3f} s | {r['max_s']:.3f} s | {budget} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    failed = [r["case"] for r in rows if r["within_budget"] is False]
    if failed:
        raise SystemExit(f"over budget: {', '.join(failed)}")


if __name__ == "__main__":
    main()
