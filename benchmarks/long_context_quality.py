"""Quality of long-context fine-tunes of ``ref``: held-out perplexity and passkey at the new context.

Each MODEL argument is ``label=PATH`` (a checkpoint directory or preset). ``label=run:RUN_DIR`` evaluates the
latest checkpoint of an unfinished ``seqtool finetune --context ... --run-dir RUN_DIR`` run: the model is rebuilt
from the run's ``run.json`` (source, context extension, LoRA kinds), the checkpoint's trainable weights are loaded
(LoRA at the default rank 8 / alpha 16) and merged, exactly what the finished run would have saved at that step.

Run:
  python benchmarks/long_context_quality.py --seq-len 8k --samples 4 \
      ref=ref ref-pi4=/tmp/ref-pi4 sinklora=run:/work/runs/longctx/run-sinklora
  (add --baseline-2k to also measure ref's perplexity at 2k, the issue's bar: ppl at 8k <= 1.1x that)
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path


def snapshot_model(run_dir: Path):
    """(model, tokenizer, step) of the latest checkpoint in ``run_dir``, LoRA merged, full attention."""
    import torch

    from seqtool.arch.io import load_model
    from seqtool.arch.rope_scaling import ContextPlan, apply_context_extension
    from seqtool.train.trainable import LoraOptions, merge, prepare

    identity = json.loads((run_dir / "run.json").read_text())
    loaded = load_model(identity["model"], dtype="fp32", apply_recipe=False)
    long = identity["long_context"]
    apply_context_extension(loaded.model, ContextPlan(**long["plan"]))
    net = prepare(loaded.model, identity["method"], identity["train"], LoraOptions())
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False, map_location="cpu")
    named = dict(net.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            named[name].copy_(value)
    model = merge(net)
    model.eval()
    return model, loaded.tokenizer, int(state["step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="label=PATH or label=run:RUN_DIR")
    parser.add_argument("--seq-len", default="8k")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--baseline-2k", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/long_context_quality.md")
    args = parser.parse_args()

    import torch

    from seqtool.eval.runner import evaluate
    from seqtool.utils import parse_length

    torch.set_num_threads(1)
    seq_len = parse_length(args.seq_len)
    depths = [float(d) for d in args.depths.split(",")]
    rows = []
    jobs = [("ref@2k", "ref", 2048, "ppl")] if args.baseline_2k else []
    jobs += [(label, target, seq_len, "ppl,passkey") for label, _, target in (m.partition("=") for m in args.models)]
    for label, target, length, tasks in jobs:
        t0 = time.time()
        note = ""
        if target.startswith("run:"):
            model, tok, step = snapshot_model(Path(target[4:]))
            note = f"checkpoint at step {step}"
            result = evaluate(model, tasks, tokenizer=tok, seq_lens=[length], samples=args.samples, depths=depths)
        else:
            result = evaluate(target, tasks, seq_lens=[length], samples=args.samples, depths=depths)
        data = asdict(result)
        ppl = data["ppl"][0]["ppl"] if data.get("ppl") else None
        scores = [s for s in data.get("scores", []) if s["task"] == "passkey"]
        passkey = (sum(s["accuracy"] * s["samples"] for s in scores) / sum(s["samples"] for s in scores)
                   if scores else None)
        rows.append({"label": label, "model": target, "seq_len": length, "ppl": ppl, "passkey": passkey,
                     "passkey_prompts": sum(s["samples"] for s in scores), "note": note,
                     "seconds": round(time.time() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    lines = ["| model | length | held-out ppl | passkey | prompts | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        pk = "-" if r["passkey"] is None else f"{r['passkey']:.2f}"
        lines.append(f"| {r['label']} | {r['seq_len']} | {r['ppl']:.2f} | {pk} | {r['passkey_prompts']} | {r['note']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/long_context_quality.py " + " ".join(
        [f"--seq-len {args.seq_len}", f"--samples {args.samples}", f"--depths {args.depths}"]
        + (["--baseline-2k"] if args.baseline_2k else []) + args.models)
    out.write_text(f"# Long-context fine-tunes of ref: quality\n\nCommand: `{command}` (1 torch thread, CPU, fp32).\n"
                   f"ppl: sliding window (stride len/2) over 16384 held-out stdlib tokens; passkey: exact match, "
                   f"{args.samples} prompts x depths {args.depths}.\n\n" + "\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
