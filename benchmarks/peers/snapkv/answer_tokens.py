"""Which keys the *answer tokens* need after a SnapKV compression (official protocol: question inside the window).

The prompt plus its expected answer is run densely (teacher forcing) and captured; the official SnapKV selection
(``SnapKVCluster.update_kv``) and seqtool's are computed on the prompt alone, as after prefill. For every query
that produces an answer token (the last prompt token, then each answer token but the last) and every needle head,
the share of that query's dense attention on the needle sentence the kept set keeps (kept + answer tokens).

    nice -n 10 python benchmarks/peers/snapkv/answer_tokens.py --official /tmp/snapkv-official --budgets 0.1,0.25 \
        -o benchmarks/results/peers_snapkv_answer_tokens.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare as C  # noqa: E402
import evict_harness as eh  # noqa: E402

sh = eh.sh


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", type=Path, required=True)
    ap.add_argument("--budgets", default="0.1,0.25")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    mod = eh.load_official(args.official, "snapkv/monkeypatch/snapkv_utils.py", "snapkv_official")
    loaded = sh.load_model("ref")
    out = []
    for s in sh.passkey_samples(loaded, 2048, [0.25, 0.5, 0.75], args.samples, 0):
        t = len(s.input_ids)
        ext = dataclasses.replace(s, input_ids=s.input_ids + s.answer_ids[:-1])
        cap = sh.capture(loaded, ext)
        n_ans = len(s.answer_ids)
        span = slice(cap["needle_pos"], cap["needle_pos"] + cap["needle_len"])
        heads = [(l, h) for l, h, _ in sh.needle_heads(dict(cap, layers={
            k: dict(v, q=v["q"][:, :t], k=v["k"][:, :t]) for k, v in cap["layers"].items()}))]
        row = {"depth": s.depth, "answer": s.answer, "answer_tokens": [loaded.tokenizer.decode([i]) for i in s.answer_ids],
               "needle_heads": [f"{l}.{h}" for l, h in heads], "budgets": {}}
        for b in [float(x) for x in args.budgets.split(",")]:
            c = C.capacity(b, t)
            per_sel = {}
            for name, fn in (("official", lambda q, k: C.official_select(mod, q, k, c)),
                             ("seqtool", lambda q, k: C.seqtool_select(q, k, c))):
                rec = {}
                for l, h in heads:
                    e = cap["layers"][l]
                    kept = fn(e["q"][:, :t], e["k"][:, :t])
                    keep = eh.positions_mask(torch.cat([kept, torch.arange(t, len(ext.input_ids)).expand(
                        kept.shape[0], -1)], 1), len(ext.input_ids))
                    p = sh.dense_probs(cap, l, n_ans)[h]  # (n_ans, T'): queries t-1 .. t+n_ans-2
                    tot = p[:, span].sum(-1)
                    kept_mass = (p[:, span] * keep[h, span]).sum(-1)
                    rec[f"{l}.{h}"] = {"needle_mass": [round(float(x), 3) for x in tot],
                                       "kept_share": [round(float(x), 3) for x in kept_mass / tot.clamp_min(1e-12)]}
                per_sel[name] = rec
            row["budgets"][str(b)] = per_sel
        out.append(row)
        print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
