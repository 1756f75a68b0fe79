"""Quality of `seqtool convert --to hybrid` on `ref`: held-out perplexity and passkey at 2k, per conversion and stage.

    seqtool convert ref --to hybrid --mixer mamba2 --keep-attention 0.5 -o /tmp/hy/mamba2   # the recipe (defaults)
    seqtool convert ref --to hybrid --mixer linear --keep-attention 0.5 -o /tmp/hy/linear
    python benchmarks/hybrid_quality.py --hybrid /tmp/hy/mamba2 --hybrid /tmp/hy/linear --stage1 --init

One row for the original, then for every ``--hybrid OUT`` (its mixer, kept layers and training steps read from the
recipe ``OUT/config.json`` records): the trained hybrid; with ``--stage1`` also the stage-1-only model (the
stage-1 checkpoint in ``OUT.run/stage1`` loaded onto the initialisation); with ``--init`` the initialisation
without training. ``--label OUT=TEXT`` adds a note to a row (e.g. "fewer steps"). Each row is cached in
``--cache`` as soon as it is done (a rerun evaluates only the missing ones) and the markdown table is written
between the ``hybrid-results`` markers of docs/hybrid.md.
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
    p.add_argument("--hybrid", action="append", default=[], help="output of `seqtool convert --to hybrid` (repeat)")
    p.add_argument("--stage1", action="store_true", help="also evaluate each hybrid after stage 1 only")
    p.add_argument("--init", action="store_true", help="also evaluate each hybrid's initialisation (no training)")
    p.add_argument("--label", action="append", default=[], help="OUT=TEXT: a note for that hybrid's rows")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--samples", type=int, default=4, help="passkey prompts per depth (5 depths)")
    p.add_argument("--ppl-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cached-only", action="store_true", help="evaluate nothing: table of the rows already cached")
    p.add_argument("--cache", default=str(ROOT / "benchmarks/results/hybrid_quality.json"))
    p.add_argument("--doc", default=str(ROOT / "docs/hybrid.md"))
    return p.parse_args()


def _evaluate(model, tokenizer, args) -> dict:
    import seqtool

    started = time.time()
    res = seqtool.evaluate(model, "ppl,passkey", tokenizer=tokenizer, seq_lens=[args.seq_len], samples=args.samples,
                           ppl_tokens=args.ppl_tokens, dtype="fp32", device="cpu")
    return {"ppl": round(res.ppl[0].ppl, 3), "passkey": round(res.mean_accuracy("passkey"), 3),
            "eval_seconds": round(time.time() - started, 1)}


def _recipe(hybrid_dir: Path) -> dict:
    """What the conversion did, from its recipe step (``config.json`` → ``seqtool.steps[-1]``)."""
    step = json.loads((hybrid_dir / "config.json").read_text())["seqtool"]["steps"][-1]
    if step.get("to") != "hybrid":
        raise SystemExit(f"{hybrid_dir} is not the output of `seqtool convert --to hybrid`")
    return step


def _rows(args, labels: dict[str, str]):
    """(row id, cells, builder) — builders load lazily so cached rows cost nothing."""
    import seqtool
    from seqtool.arch.io import load_model

    def original():
        loaded = load_model(args.model, device="cpu", dtype="fp32")
        return loaded.model, loaded.tokenizer

    rows = [("original", {"mixer": "-", "converted": "none", "training": "original model"}, original)]
    for hybrid in args.hybrid:
        out = Path(hybrid)
        step = _recipe(out)
        kept = step["attention_layers_kept"]
        n_layers = json.loads((out / "config.json").read_text())["num_hidden_layers"]
        converted = [i for i in range(n_layers) if i not in kept]
        options = {k: step[k] for k in ("mixer", "seed", "window", "init") if k in step}
        note = f" ({labels[hybrid]})" if hybrid in labels else ""
        base = {"mixer": step["mixer"], "converted": f"{len(converted)} of {n_layers} ({converted})"}

        def init_only(options=options, kept=kept):
            res = seqtool.convert(args.model, "hybrid", attention_layers=kept, steps1=0, steps2=0, dtype="fp32",
                                  device="cpu", **options)
            return res.model, res.tokenizer

        def stage1_only(out=out, init_only=init_only):
            model, tok = init_only()
            ckpt = torch.load(Path(f"{out}.run") / "stage1" / "checkpoint.pt", weights_only=False)
            missing = model.load_state_dict(ckpt["trainable"], strict=False)
            assert not missing.unexpected_keys, missing.unexpected_keys
            return model, tok

        def final(out=out):
            loaded = load_model(str(out), device="cpu", dtype="fp32")
            return loaded.model, loaded.tokenizer

        init_name = "random init" if step.get("init") == "random" else "init from attention"
        if args.init:
            rows.append((f"{out}:init", {**base, "training": f"{init_name}, no training{note}"}, init_only))
        if args.stage1 and step["steps1"] > 0:
            rows.append((f"{out}:stage1", {**base, "training": f"{init_name}, stage 1 only ({step['steps1']} "
                                                              f"steps){note}"}, stage1_only))
        rows.append((f"{out}:final", {**base, "training": f"{init_name}, stage 1 + 2 ({step['steps1']} + "
                                                          f"{step['steps2']} steps){note}"}, final))
    return rows


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    labels = dict(item.split("=", 1) for item in args.label)
    cache_path = Path(args.cache)
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    settings = {"model": args.model, "seq_len": args.seq_len, "samples": args.samples, "ppl_tokens": args.ppl_tokens}
    if cache.get("settings") != settings:
        cache = {"settings": settings, "rows": {}}
    rows = _rows(args, labels)
    if args.cached_only:
        rows = [r for r in rows if r[0] in cache["rows"] and cache["rows"][r[0]].get("cells") == r[1]]
    for key, cells, build in rows:
        if key in cache["rows"] and cache["rows"][key].get("cells") == cells:
            continue
        model, tok = build()
        model.eval()
        cache["rows"][key] = {"cells": cells, **_evaluate(model, tok, args)}
        print(json.dumps({key: cache["rows"][key]}), flush=True)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(cache, indent=1) + "\n")
    base = cache["rows"]["original"]["ppl"]
    lines = [f"Held-out perplexity (built-in held-out split, {args.ppl_tokens} tokens, {args.seq_len}-token windows) "
             f"and passkey accuracy at {args.seq_len} tokens ({args.samples} prompts x 5 depths), "
             "`python benchmarks/hybrid_quality.py` (results in `benchmarks/results/hybrid_quality.json`).", "",
             "| mixer | layers converted | training | ppl | ppl / original | passkey@2k |", "|---|---|---|---|---|---|"]
    for key, _, _ in rows:
        r = cache["rows"][key]
        c = r["cells"]
        lines.append(f"| {c['mixer']} | {c['converted']} | {c['training']} | {r['ppl']:.2f} | {r['ppl'] / base:.3f} "
                     f"| {r['passkey']:.2f} |")
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
