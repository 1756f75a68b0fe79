"""Attention recall of sparse methods on passkey prompts: why a method loses the needle.

For each method spec, every passkey prompt runs through ``greedy_generate`` (prefill, the last ``tail`` prompt
tokens one at a time, then the answer) under a :class:`seqtool.patches.recall.RecallMeter`; prints accuracy and
the recall (share of the dense attention mass the selection kept) on the answer queries and on all queries, per
layer (mean over heads) and the worst head.

    python benchmarks/sparse_recall.py --specs "block_topk:budget=0.5,min_len=0" "infllm:budget=0.5,min_len=0"
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def run(loaded, spec: str, samples, tail: int) -> dict:
    from seqtool.eval.generate import greedy_generate
    from seqtool.eval.scoring import exact_match, stop_token_ids
    from seqtool.patches import apply_attn_spec
    from seqtool.patches.recall import RecallMeter

    m, tok = loaded.model, loaded.tokenizer
    handle = apply_attn_spec(m, spec)
    stops = stop_token_ids(tok)
    hits = []
    dec = [0.0, 0.0]  # kept / causal pairs of the decode calls (tail + answer)
    t0 = time.time()
    try:
        with RecallMeter(handle) as meter, torch.no_grad():
            def phase(name):
                if meter.phase == "prefill" and name != "prefill":
                    handle.reset_stats()
                meter.phase = name
            for s in samples:
                gen = greedy_generate(m, [s.input_ids], len(s.answer_ids) + 4, pad_id=tok.pad_token_id or 0,
                                      stop_ids=stops, tail=tail, on_phase=phase)
                meter.phase = "prefill"
                dec[0] += sum(float(rt.kept_pairs.sum()) for rt in handle.runtimes.values())
                dec[1] += sum(rt.total_pairs for rt in handle.runtimes.values())
                hits.append(bool(exact_match(tok.decode(gen[0], skip_special_tokens=True), s.answer)))
        ans, all_ = meter.per_head("answer"), meter.per_head(None)
    finally:
        handle.remove()
    return {"spec": spec, "accuracy": sum(hits) / len(hits), "hits": hits,
            "recall_answer": meter.mean("answer"), "recall_all": meter.mean(None),
            "answer_per_layer": [round(float(x), 3) for x in ans.mean(1)],
            "answer_min_head": [round(float(x), 3) for x in ans.min(1).values],
            "all_per_layer": [round(float(x), 3) for x in all_.mean(1)],
            "kept_decode": dec[0] / dec[1] if dec[1] else float("nan"), "skipped": meter.skipped, "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ref")
    ap.add_argument("--specs", nargs="+", required=True)
    ap.add_argument("--task", default="passkey")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--depths", default="0.25,0.5,0.75")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--tail", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import seqtool
    from seqtool.eval.runner import heldout_tokens
    from seqtool.eval.tasks import make_samples

    torch.set_num_threads(args.threads)
    loaded = seqtool.load(args.model, dtype="float32", device="cpu")
    tok = loaded.tokenizer
    depths = [float(d) for d in args.depths.split(",")]
    samples = make_samples(args.task, tok, heldout_tokens(tok), args.seq_len, depths, args.samples, 0)
    for spec in args.specs:
        r = run(loaded, spec, samples, args.tail)
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            print(f"{spec:55s} acc {r['accuracy']:.2f} recall answer {r['recall_answer']:.3f} all "
                  f"{r['recall_all']:.3f} kept decode {r['kept_decode']:.3f} | answer/layer {r['answer_per_layer']} "
                  f"min head {r['answer_min_head']} | all/layer {r['all_per_layer']} ({r['seconds']} s)",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
