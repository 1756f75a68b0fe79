"""Run ``--method s2attn`` / ``--method lora`` (full attention) with the same steps as a finished sinklora recipe
run, sharing its short phase: the rows of the model's trained context (2048 for ``ref``) are one group of
``context/4`` tokens, where sinklora, s2attn and full attention compute the same causal attention (tested:
``tests/train/test_shifted_attention.py``, group >= length == SDPA causal). So the sinklora run's checkpoint at the
end of that phase is also the s2attn / lora run's checkpoint there: it is copied into a new run directory whose
``run.json`` is the sinklora one with the attention fields of METHOD, and ``finetune(..., resume=True)`` trains
the remaining (long-row) steps with METHOD's attention. Then ppl / passkey as benchmarks/long_context_recipe.py.

  python benchmarks/long_context_branch.py --method s2attn --from-run /work/runs/longctx/C.run \
      --checkpoint /work/runs/longctx/C.step360.pt --set steps=400 --set short_frac=0.9 ... -o OUT --name C-s2attn
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from long_context_recipe import parse_value  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", required=True, choices=["s2attn", "lora", "sinklora"])
    ap.add_argument("--from-run", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--context", default="8k")
    ap.add_argument("--rope-scale", default="linear:4")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--name", required=True)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--results", default="benchmarks/results")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    import seqtool.train.long_context as lc
    from seqtool.train.finetune import finetune

    overrides = {k: parse_value(v) for k, _, v in (s.partition("=") for s in args.set)}
    lc.LONG_RECIPE.update(overrides)
    run_dir = Path(args.output + ".run")
    if not (run_dir / "checkpoint.pt").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        identity = json.loads((Path(args.from_run) / "run.json").read_text())
        long = identity["long_context"]
        if args.method == "lora":
            long.update(attention=None, group_size=None, sinks=0)
        else:
            long.update(attention=args.method, sinks=4 if args.method == "sinklora" else 0)
        (run_dir / "run.json").write_text(json.dumps(identity, indent=1))
        shutil.copy(args.checkpoint, run_dir / "checkpoint.pt")
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False, map_location="cpu")
    branched_at = int(state["step"])
    del state
    c0, w0 = time.process_time(), time.time()
    result = finetune("ref", method=args.method, context=args.context, rope_scale=args.rope_scale,
                      output=args.output, run_dir=run_dir, resume=True, save_every="5m", progress="lines", force=True)
    record = {"name": args.name, "method": args.method, "recipe": dict(lc.LONG_RECIPE), "overrides": overrides,
              "branched_from": args.from_run, "branched_at_step": branched_at,
              "train_cpu_s": round(time.process_time() - c0, 1), "train_wall_s": round(time.time() - w0, 1),
              "steps": result.steps, "tokens": result.tokens, "heldout_ppl": result.heldout_ppl,
              "loss_final": result.loss_final, "data": result.data, "history": result.history}
    from long_context_recipe import evaluate_into

    evaluate_into(record, args.output, args.context, args.samples)
    out = Path(args.results) / f"long_context_recipe_{args.name}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "history"}), flush=True)


if __name__ == "__main__":
    main()
