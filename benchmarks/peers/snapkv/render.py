"""Render a ``compare.py`` JSON (snapkv or h2o) as the markdown tables of ``benchmarks/results/peers_<method>.md``.

    python benchmarks/peers/snapkv/render.py benchmarks/results/peers_snapkv.json > /tmp/tables.md
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


WINDOW_LABELS = True


def protocol(tail: int) -> str:
    if WINDOW_LABELS:  # SnapKV: where the question sits relative to the observation window
        return "tail 16 (question outside the window)" if tail else "tail 0 (official: question inside the window)"
    return "tail 16 (question decoded after the prefill)" if tail else "tail 0 (whole prompt prefilled, official)"


def render(result: dict) -> str:
    global WINDOW_LABELS
    WINDOW_LABELS = "SnapKV" in result["official_repo"]
    out = [f"Official: `{result['official_repo']}` @ `{result['official_commit']}`, "
           f"`{result['official_function']}`.", ""]
    if result["passkey"]:
        out += ["### Passkey with the selection plugged in (`ref`, 2048 tokens, depths 0.25/0.5/0.75)", ""]
        budgets = sorted({r["budget"] for r in result["passkey"]}, reverse=True)
        out += ["| protocol | selection | " + " | ".join(f"{b:g}" for b in budgets) + " |",
                "|---|---|" + "---|" * len(budgets)]
        cells = defaultdict(dict)
        for r in result["passkey"]:
            cells[(r["tail"], r["selection"])][r["budget"]] = f"{r['passkey']:.2f} ({sum(r['hits'])}/{r['n']})"
        for (tail, sel), by_b in sorted(cells.items(), key=lambda x: (-x[0][0], x[0][1])):
            out.append(f"| {protocol(tail)} | {sel} | " + " | ".join(by_b.get(b, "–") for b in budgets) + " |")
        out.append("")
    out += ["### Same captures: needle recall per needle head (answer query), mean answer recall over all heads, "
            "kept-set overlap with seqtool", ""]
    out += ["| depth | protocol | budget (kept/head) | selection | needle recall per needle head | "
            "answer recall per needle head | mean answer recall | overlap with seqtool (needle heads) |",
            "|---|---|---|---|---|---|---|---|"]
    for row in result["captures"]:
        kept = row.get("capacity", row.get("cache"))
        for name, s in row["selections"].items():
            nr = ", ".join(f"{h} {v:.2f}" for h, v in s["needle_recall"].items())
            ar = ", ".join(f"{h} {v:.2f}" for h, v in s["answer_recall"].items())
            ov = ", ".join(f"{v:.2f}" for v in s["overlap_with_seqtool"].values())
            out.append(f"| {row['depth']:.2f} | {protocol(row['tail'])} | {row['budget']:g} ({kept}) | {name} | {nr} | "
                       f"{ar} | {s['mean_answer_recall']:.3f} | {ov} |")
    checks = [row.get("replica_vs_seqtool_cache_min_overlap",
                      row.get("replica_vs_seqtool_cache_min_overlap_after_prefill")) for row in result["captures"]]
    out += ["", f"seqtool's selection replayed in this script equals the kept set of seqtool's own cache layer "
                f"(`make_cache`, prefill) on every capture, budget and protocol: minimum overlap "
                f"{min(checks):.3f}." if checks else ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(render(json.loads(open(sys.argv[1]).read())))
