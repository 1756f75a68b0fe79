"""Search for the long-context recipe: run ``finetune(MODEL, method=..., context=..., rope_scale=...)`` exactly as the
CLI does, with some of :data:`seqtool.train.long_context.LONG_RECIPE` overridden, then measure held-out ppl and
passkey at the new context. Records the process CPU time (the machine is shared: wall time is not the cost).

  python benchmarks/long_context_recipe.py --name A --set steps=500 --set short_frac=0.7 \
      --set loss=lm=1,answer=1,kl=1 -o /work/runs/longctx/A
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path


def parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def evaluate_into(record: dict, model: str, context: str, samples: int) -> None:
    """Held-out ppl (sliding window, stride context/2, 16384 stdlib held-out tokens) and passkey (``samples`` x 5
    depths) at ``context``, full attention, added to ``record``."""
    from seqtool.eval.runner import evaluate
    from seqtool.utils import parse_length

    c1 = time.process_time()
    res = asdict(evaluate(model, "ppl,passkey", seq_lens=[parse_length(context)], samples=samples,
                          depths=[0, 0.25, 0.5, 0.75, 1]))
    scores = [s for s in res["scores"] if s["task"] == "passkey"]
    record.update({"ppl": res["ppl"][0]["ppl"],
                   "passkey": sum(s["accuracy"] * s["samples"] for s in scores) / sum(s["samples"] for s in scores),
                   "passkey_prompts": sum(s["samples"] for s in scores), "eval_cpu_s": round(time.process_time() - c1, 1)})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ref")
    ap.add_argument("--method", default="sinklora")
    ap.add_argument("--context", default="8k")
    ap.add_argument("--rope-scale", default="linear:4")
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE override of LONG_RECIPE")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lora-alpha", type=int, default=None, help="default: 2 x rank (the CLI's 8/16 ratio)")
    ap.add_argument("--name", required=True)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--save-every", default="5m")
    ap.add_argument("--eval-only", action="store_true", help="only evaluate the existing -o model")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--results", default="benchmarks/results")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    import seqtool.train.long_context as lc
    from seqtool.train.finetune import finetune

    overrides = {}
    for item in args.set:
        k, _, v = item.partition("=")
        overrides[k] = parse_value(v)
    lc.LONG_RECIPE.update(overrides)
    alpha = args.lora_alpha or 2 * args.lora_rank
    record = {"name": args.name, "method": args.method, "context": args.context, "rope_scale": args.rope_scale,
              "recipe": dict(lc.LONG_RECIPE), "overrides": overrides, "lora_rank": args.lora_rank, "lora_alpha": alpha}
    if not args.eval_only:
        c0, w0 = time.process_time(), time.time()
        run_dir = Path(args.output + ".run")
        result = finetune(args.model, method=args.method, context=args.context, rope_scale=args.rope_scale,
                          output=args.output, run_dir=run_dir, resume=(run_dir / "checkpoint.pt").exists(),
                          save_every=args.save_every, progress="lines", force=True, lora_rank=args.lora_rank,
                          lora_alpha=alpha)
        hist = result.history
        record.update({"train_cpu_s": round(time.process_time() - c0, 1), "train_wall_s": round(time.time() - w0, 1),
                       "steps": result.steps, "tokens": result.tokens, "tokens_per_s": result.tokens_per_s,
                       "resumed_from": result.resumed_from, "heldout_ppl_before": result.heldout_ppl_before,
                       "heldout_ppl": result.heldout_ppl, "loss_first": result.loss_first,
                       "loss_final": result.loss_final, "teacher": result.teacher, "data": result.data})
        record["history"] = hist
    evaluate_into(record, args.output, args.context, args.samples)
    out = Path(args.results) / f"long_context_recipe_{args.name}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "history"}), flush=True)


if __name__ == "__main__":
    main()
