"""Passkey at the new context of a context-extended model under inference-time sparse attention patches.

  python benchmarks/long_context_sparse.py /work/runs/longctx/ref-8k-final --seq-len 8k --samples 2 \
      --attn streaming:budget=0.25,min_len=0 --attn block_topk:budget=0.25,min_len=0 --attn h2o:budget=0.25,min_len=0

Same prompts as the dense passkey column of docs/long_context.md (seed 0, ``samples`` x depths 0..1). Each row is
what ``seqtool eval MODEL --task passkey --seq-len 8k --samples 2 --attn SPEC`` prints.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--seq-len", default="8k")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--attn", action="append", default=[])
    ap.add_argument("--out", default="benchmarks/results/long_context_sparse.md")
    args = ap.parse_args()

    import torch

    from seqtool.eval.runner import evaluate
    from seqtool.utils import parse_length

    torch.set_num_threads(1)
    rows = []
    for spec in args.attn:
        c0 = time.process_time()
        res = asdict(evaluate(args.model, "passkey", seq_lens=[parse_length(args.seq_len)], samples=args.samples,
                              depths=[0, 0.25, 0.5, 0.75, 1], attn=None if spec == "dense" else spec))
        scores = [s for s in res["scores"] if s["task"] == "passkey"]
        n = sum(s["samples"] for s in scores)
        rows.append({"attn": spec, "passkey": sum(s["accuracy"] * s["samples"] for s in scores) / n, "prompts": n,
                     "cpu_s": round(time.process_time() - c0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    lines = [f"# Passkey at {args.seq_len} of {args.model} under sparse attention patches", "",
             "Command: `python benchmarks/long_context_sparse.py " + " ".join(
                 [args.model, f"--seq-len {args.seq_len}", f"--samples {args.samples}"]
                 + [f"--attn {a}" for a in args.attn]) + "` (1 thread, CPU, fp32)", "",
             "| attention | passkey | prompts | CPU s |", "|---|---|---|---|"]
    lines += [f"| {r['attn']} | {r['passkey']:.2f} | {r['prompts']} | {r['cpu_s']} |" for r in rows]
    out = Path(args.out)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
