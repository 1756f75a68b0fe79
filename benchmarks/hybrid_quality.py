"""Quality of `seqtool convert --to hybrid` on `ref`: held-out perplexity and passkey at 2k, per training stage.

    seqtool convert ref --to hybrid --mixer mamba2 --keep-attention 0.5 -o /tmp/hyref/mamba2   # the recipe (defaults)
    python benchmarks/hybrid_quality.py --hybrid /tmp/hyref/mamba2     # evaluates the rows below, resumable

Rows (2 of 4 layers converted, the kept layers read from the hybrid's recipe): the original; the Mamba-in-the-Llama
initialisation without training; after stage 1 only (the stage-1 checkpoint in ``HYBRID.run/stage1`` loaded onto
the initialisation); both stages (the saved hybrid). Each row is cached in ``--cache`` as soon as it is done, and
the markdown table is written between the ``hybrid-results`` markers of docs/hybrid.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MARK_BEGIN, MARK_END = "<!-- hybrid-results:begin -->", "<!-- hybrid-results:end -->"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ref")
    p.add_argument("--hybrid", required=True, help="output of `seqtool convert --to hybrid` (with its OUT.run)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--samples", type=int, default=10, help="passkey prompts per depth (5 depths)")
    p.add_argument("--ppl-tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default=str(ROOT / "benchmarks/results/hybrid_quality.json"))
    p.add_argument("--doc", default=str(ROOT / "docs/hybrid.md"))
    p.add_argument("--only", default=None, help="comma list of rows to evaluate now (original,init,stage1,final)")
    return p.parse_args()


def _evaluate(model, tokenizer, args) -> dict:
    import seqtool

    started = time.time()
    res = seqtool.evaluate(model, "ppl,passkey", tokenizer=tokenizer, seq_lens=[args.seq_len], samples=args.samples,
                           ppl_tokens=args.ppl_tokens, dtype="fp32", device="cpu")
    return {"ppl": round(res.ppl[0].ppl, 3), "passkey": round(res.mean_accuracy("passkey"), 3),
            "eval_seconds": round(time.time() - started, 1)}


def _rows(args):
    """(row id, description, builder) — builders load lazily so cached rows cost nothing."""
    import seqtool
    from seqtool.arch.io import load_model

    hybrid_dir = Path(args.hybrid)
    run_json = Path(f"{hybrid_dir}.run") / "stage1" / "run.json"
    if (hybrid_dir / "config.json").exists():
        step = json.loads((hybrid_dir / "config.json").read_text())["seqtool"]["steps"][-1]
        kept = step["attention_layers_kept"]
    else:  # the conversion is still running: what its run directory says
        ident = json.loads(run_json.read_text())
        kept = ident["attention_layers"]
        d = ident["distill"]
        step = {"seed": d["seed"], "steps1": d["steps1"], "steps2": d["steps2"], "train_seq_len": d["seq_len"],
                "lora_r": d["lora_r"]}

    def original():
        loaded = load_model(args.model, device="cpu", dtype="fp32")
        return loaded.model, loaded.tokenizer

    def init_only():
        res = seqtool.convert(args.model, "hybrid", attention_layers=kept, steps1=0, steps2=0, seed=step["seed"],
                              dtype="fp32", device="cpu")
        return res.model, res.tokenizer

    def stage1_only():
        model, tok = init_only()
        ckpt = torch.load(Path(f"{hybrid_dir}.run") / "stage1" / "checkpoint.pt", weights_only=False)
        missing = model.load_state_dict(ckpt["trainable"], strict=False)
        assert not missing.unexpected_keys, missing.unexpected_keys
        return model, tok

    def final():
        loaded = load_model(str(hybrid_dir), device="cpu", dtype="fp32")
        return loaded.model, loaded.tokenizer

    desc = f"steps1={step['steps1']}, steps2={step['steps2']}, seq_len={step['train_seq_len']}, lora_r={step['lora_r']}"
    return kept, step, [
        ("original", "original (all 4 layers attention)", original),
        ("init", "Mamba-in-the-Llama init, no training", init_only),
        ("stage1", f"stage 1 only ({step['steps1']} steps)", stage1_only),
        ("final", f"stage 1 + stage 2 ({desc}; the command's defaults)", final),
    ]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cache_path = Path(args.cache)
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    kept, step, rows = _rows(args)
    settings = {"seq_len": args.seq_len, "samples": args.samples, "ppl_tokens": args.ppl_tokens, "kept": kept}
    if cache.get("settings") != settings:
        cache = {"settings": settings, "rows": {}}
    only = set(args.only.split(",")) if args.only else None
    for key, text, build in rows:
        if key in cache["rows"] or (only is not None and key not in only):
            continue
        model, tok = build()
        model.eval()
        cache["rows"][key] = {"row": text, **_evaluate(model, tok, args)}
        print(json.dumps(cache["rows"][key]), flush=True)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(cache, indent=1) + "\n")
    if any(key not in cache["rows"] for key, _, _ in rows):
        return  # the table needs every row
    base = cache["rows"]["original"]["ppl"]
    lines = [f"Attention layers kept: {kept} (chosen by retrieval score); Mamba2 in the others. Held-out perplexity "
             f"(stdlib held-out split, {args.ppl_tokens} tokens, {args.seq_len}-token windows) and passkey accuracy "
             f"at {args.seq_len} tokens ({args.samples} prompts x 5 depths). "
             "`python benchmarks/hybrid_quality.py --hybrid OUT`.", "",
             "| model | ppl | ppl / original | passkey@2k |", "|---|---|---|---|"]
    for key, _, _ in rows:
        r = cache["rows"][key]
        lines.append(f"| {r['row']} | {r['ppl']:.2f} | {r['ppl'] / base:.3f} | {r['passkey']:.2f} |")
    table = "\n".join(lines)
    print(table)
    doc = Path(args.doc)
    text = doc.read_text()
    if MARK_BEGIN in text and MARK_END in text:
        head, rest = text.split(MARK_BEGIN, 1)
        _, tail = rest.split(MARK_END, 1)
        doc.write_text(head + MARK_BEGIN + "\n" + table + "\n" + MARK_END + tail)


if __name__ == "__main__":
    main()
