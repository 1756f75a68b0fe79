"""seqtool's ``hip`` against HiP's official selection on the same inputs (issue 17).

Official side: ``hip_attention`` of DeepAuto-AI/hip-attention ``src/hip_attn/v1_0/attention1_block_gpu.py`` (the
paper's hierarchical top-k mask estimation, Triton), imported from ``--official`` and run under the Triton
interpreter (see ``official.py`` for the shims). Its defaults are kept: ``block_size_q=32``, ``block_size_k=2``,
``reduce_stride=2``, ``scale_up=2`` (``w_start = 2 mask_k``, ``n_patches = mask_k / 2``), 128-key sliding window,
``num_sink = 32 / block_size_k`` (32 sink tokens), the 2x lower-resolution estimator, the decode-time grid stride,
and its prompt rule (a prompt shorter than ``dense_queries_exp`` runs densely); ``sampling_method="first"`` and
``enable_sparq=False`` as the repository's own ``HIP_LEGACY`` model path passes them.

Budget: seqtool's ``hip`` keeps ``budget * T`` key positions at the answer query (one 64-token sink block, the
64-token block holding the query, the rest as 1-token leaves of the tree). The official kernel attends 32 sinks +
the 128-key window + ``mask_k`` tree keys, so by its own count ``mask_k = budget * T - 160`` (352 / 864 at 2048
tokens, budgets 0.25 / 0.5). The official tree returns fewer distinct keys than ``mask_k`` (collisions of the
lower-resolution estimator, blocks inside the window or the sinks), so ``--mask-k`` lets you raise it until the
measured kept count matches; both the nominal and the measured counts are reported.

    TRITON_INTERPRET=1 python benchmarks/peers/hip/compare.py recall --official /tmp/hip-official \\
        --caps /tmp/caps --budgets 0.5,0.25 -o /tmp/hip-recall.json
    TRITON_INTERPRET=1 python benchmarks/peers/hip/compare.py passkey --official /tmp/hip-official \\
        --budget 0.25 --tail 1 --trace 1.7,2.3,2.4,3.3 -o /tmp/hip-passkey-0.25.json
    python benchmarks/peers/hip/compare.py report --recall /tmp/hip-recall.json --passkey /tmp/hip-passkey-0.25.json

``recall``: per capture, budget, layer and head at the answer query (the last prompt token, a decode call in both
codes): needle recall, answer recall (selection_harness), kept keys, and the kept-set overlap (IoU) of the two
selections. ``passkey``: passkey accuracy with each selection plugged into every layer (``passkey_with_selector``:
prefill, the last ``--tail`` prompt tokens one by one, greedy answer); calls of more than 32 queries (the prefill)
run densely in both (the official prompt rule decides it for the official side: dense at 2048 tokens), so the two
differ only in the decode-time selection. The official selection costs ~7 CPU-s per layer and decode call.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # selection_harness
sys.path.insert(0, str(HERE))  # official

import official  # noqa: E402
import selection_harness as H  # noqa: E402

SINKS_PLUS_WINDOW = 32 + 128


def nominal_mask_k(budget: float, seq_len: int) -> int:
    return int(round(budget * seq_len)) - SINKS_PLUS_WINDOW


def seqtool_keep(method, layer: int, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """bool ``(Hq, Tq, Tk)``: seqtool ``hip``'s keys for queries ``q`` ``(Hq, Tq, D)`` (post-RoPE) over ``k``."""
    from seqtool.patches.base import AttnCall

    call = AttnCall(q=q[None], k=k[None], v=k[None], scale=scale, layer_idx=layer, rows=torch.arange(1),
                    key_offset=0)
    sel = method.select_decode(call) if call.is_decode else method.select(call)
    return sel.mask()[0]


def official_keep(q: torch.Tensor, k: torch.Tensor, scale: float, mask_k: int, **kw) -> torch.Tensor | None:
    """bool ``(Hq, Tq, Tk)`` from the official code, or None where it runs the call densely."""
    r = official.official_select(q * scale, k, k, mask_k, dense_queries_exp=kw.pop("dense_queries_exp", None), **kw)
    if r is None:
        return None
    indices, ks, params = r
    return official.keep_mask(indices, ks, q.shape[1], k.shape[1], params)


def make_method(budget: float):
    from seqtool.patches.hip import HipMethod

    return HipMethod(budget=budget, min_len=0)


def cmd_recall(args) -> dict:
    caps = sorted(Path(args.caps).glob("passkey-*.pt"))
    rows = []
    for path in caps:
        cap = H.load_capture(path)
        heads = {(l, h): m for l, h, m in H.needle_heads(cap)}
        for budget in args.budgets:
            mk = args.mask_k.get(budget) or nominal_mask_k(budget, cap["seq_len"])
            method = make_method(budget)
            for layer in sorted(cap["layers"]):
                e = cap["layers"][layer]
                q, k = e["q"][:, -1:], e["k"]
                t0 = time.time()
                off = official_keep(q, k, cap["scale"], mk)[:, 0]
                dt = time.time() - t0
                ours = seqtool_keep(method, layer, q, k, cap["scale"])[:, 0]
                res = {"official": (H.needle_recall(cap, layer, off), H.answer_recall(cap, layer, off), off.sum(-1)),
                       "seqtool": (H.needle_recall(cap, layer, ours), H.answer_recall(cap, layer, ours),
                                   ours.sum(-1))}
                iou = H.kept_overlap(off, ours)
                for h in range(q.shape[0]):
                    row = {"capture": path.name, "depth": round(cap["depth"], 3), "budget": budget, "mask_k": mk,
                           "layer": layer, "head": h, "needle_head": (layer, h) in heads,
                           "needle_mass": heads.get((layer, h)), "overlap": round(float(iou[h]), 4)}
                    for side, (nr, ar, kept) in res.items():
                        row[f"{side}_needle"] = round(float(nr[h]), 4)
                        row[f"{side}_answer"] = round(float(ar[h]), 4)
                        row[f"{side}_kept"] = int(kept[h])
                    rows.append(row)
                print(f"{path.name} b={budget} mask_k={mk} L{layer} official {dt:.0f}s "
                      f"needle off/ours {res['official'][0].mean():.3f}/{res['seqtool'][0].mean():.3f} "
                      f"kept {res['official'][2].float().mean():.0f}/{res['seqtool'][2].float().mean():.0f}",
                      flush=True)
    return {"rows": rows}


def cmd_passkey(args) -> dict:
    loaded = H.load_model("ref")
    samples = H.passkey_samples(loaded, args.seq_len, args.depths, args.samples, args.seed)
    budget = args.budget
    mk = args.mask_k.get(budget) or nominal_mask_k(budget, args.seq_len)
    method = make_method(budget)
    scale = loaded.model.config.head_dim ** -0.5 if getattr(loaded.model.config, "head_dim", None) else None
    stats = {"official_calls": 0, "official_dense_calls": 0, "official_s": 0.0}

    def official_sel(layer, q, k):
        s = scale or q.shape[-1] ** -0.5
        t0 = time.time()
        keep = official_keep(q[0], k[0], s, mk)
        stats["official_s"] += time.time() - t0
        stats["official_calls"] += 1
        if keep is None:
            stats["official_dense_calls"] += 1
            return None
        return keep[None]

    def seqtool_sel(layer, q, k):
        if q.shape[2] > 32:  # same prompt rule as the official run (dense at 2048 tokens)
            return None
        return seqtool_keep(method, layer, q[0], k[0], scale or q.shape[-1] ** -0.5)[None]

    out = {"budget": budget, "mask_k": mk, "samples": [
        {"depth": round(s.depth, 3), "answer": s.answer} for s in samples]}
    heads = [tuple(int(x) for x in h.split(".")) for h in args.trace.split(",")] if args.trace else []
    for name, sel in (("seqtool", seqtool_sel), ("official", official_sel))[:: -1 if args.official_first else 1]:
        if name in args.skip:
            continue
        t0 = time.time()
        hits, trace = [], []
        for s in samples:
            span = (s.needle_pos, s.needle_pos + H._needle_len(loaded.tokenizer, s))
            hits += H.passkey_with_selector(loaded, [s], _traced(sel, heads, span, trace, s.depth), tail=args.tail)
        out[name] = {"hits": hits, "accuracy": sum(hits) / len(hits), "seconds": round(time.time() - t0)}
        if heads:
            out[name]["trace"] = trace
        print(name, {k: v for k, v in out[name].items() if k != "trace"}, flush=True)
    out["official_stats"] = stats
    return out


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def cmd_report(args) -> str:
    """Markdown tables from the JSON files of ``recall`` and ``passkey`` runs."""
    lines = []
    for path in args.recall:
        d = json.loads(Path(path).read_text())
        rows = d["rows"]
        lines += [f"### Answer-query selection (`{path.name}`: {' '.join(d['argv'])})", "",
                  "| capture (depth) | budget | official mask_k | head | needle mass | needle recall official / "
                  "seqtool | answer recall official / seqtool | kept official / seqtool | overlap (IoU) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["needle_head"]:
                lines.append(f"| {r['depth']} | {r['budget']} | {r['mask_k']} | {r['layer']}.{r['head']} | "
                             f"{r['needle_mass']} | {r['official_needle']:.3f} / {r['seqtool_needle']:.3f} | "
                             f"{r['official_answer']:.3f} / {r['seqtool_answer']:.3f} | {r['official_kept']} / "
                             f"{r['seqtool_kept']} | {r['overlap']:.3f} |")
        lines += ["", "| budget | official mask_k | heads | needle recall official / seqtool | answer recall official"
                  " / seqtool | worst answer recall official / seqtool | kept official / seqtool | overlap |",
                  "|---|---|---|---|---|---|---|---|"]
        for b in sorted({r["budget"] for r in rows}, reverse=True):
            for label, sel in (("needle heads", lambda r: r["needle_head"]), ("all heads", lambda r: True)):
                rs = [r for r in rows if r["budget"] == b and sel(r)]
                if not rs:
                    continue
                needle = (f"{_mean(r['official_needle'] for r in rs):.3f} / {_mean(r['seqtool_needle'] for r in rs):.3f}"
                          if label == "needle heads" else "–")
                lines.append(
                    f"| {b} | {rs[0]['mask_k']} | {label} ({len(rs)}) | {needle} | "
                    f"{_mean(r['official_answer'] for r in rs):.3f} / {_mean(r['seqtool_answer'] for r in rs):.3f} | "
                    f"{min(r['official_answer'] for r in rs):.3f} / {min(r['seqtool_answer'] for r in rs):.3f} | "
                    f"{_mean(r['official_kept'] for r in rs):.0f} / {_mean(r['seqtool_kept'] for r in rs):.0f} | "
                    f"{_mean(r['overlap'] for r in rs):.3f} |")
        lines.append("")
    if args.passkey:
        lines += ["### Passkey with the selection plugged into every layer", "",
                  "| budget | official mask_k | prompts | official | seqtool (same protocol) | tail | time official |",
                  "|---|---|---|---|---|---|---|"]
        for path in args.passkey:
            d = json.loads(Path(path).read_text())
            tail = d["argv"][d["argv"].index("--tail") + 1] if "--tail" in d["argv"] else "16"

            def acc(side):
                return f"{d[side]['accuracy']:.2f} ({sum(d[side]['hits'])}/{len(d[side]['hits'])})" \
                    if side in d else "–"
            lines.append(f"| {d['budget']} | {d['mask_k']} | {len(d['samples'])} | {acc('official')} | "
                         f"{acc('seqtool')} | {tail} | {d.get('official', {}).get('seconds', '–')} s |")
        lines.append("")
    text = "\n".join(lines)
    if args.out:
        args.out.write_text(text)
    print(text)
    return text


def _traced(sel, heads, span, trace, depth):
    """``sel`` that also records, per decode call and traced head, the query's dense mass on the needle and the
    share of it the selection keeps (the masses are of this run's own q/k, after the earlier layers' selections)."""
    if not heads:
        return sel

    def run(layer, q, k):
        keep = sel(layer, q, k)
        if q.shape[2] > 32:
            return keep
        g = q.shape[1] // k.shape[1]
        p = torch.softmax((q[0, :, -1:] @ k[0].repeat_interleave(g, 0).transpose(-1, -2)).float()
                          * q.shape[-1] ** -0.5, -1)[:, 0]
        for lh, h in heads:
            if lh == layer:
                part = p[h, span[0]:span[1]]
                kept = part if keep is None else part * keep[0, h, -1, span[0]:span[1]]
                trace.append({"depth": round(depth, 3), "layer": layer, "head": h, "pos": k.shape[2] - 1,
                              "mass": round(float(part.sum()), 3),
                              "kept": round(float(kept.sum() / part.sum().clamp_min(1e-12)), 3)})
        return keep

    return run


def _budgets(s: str) -> list[float]:
    return [float(x) for x in s.split(",")]


def _mask_ks(s: str) -> dict:
    return {float(a): int(b) for a, b in (p.split("=") for p in s.split(","))} if s else {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("recall", "passkey"):
        p = sub.add_parser(name)
        p.add_argument("--official", required=True, help="hip-attention checkout root (holds src/hip_attn)")
        p.add_argument("--mask-k", type=_mask_ks, default={}, help="budget=mask_k,... (default: budget*T - 160)")
        p.add_argument("-o", "--out", type=Path, required=True)
    r = sub.choices["recall"]
    r.add_argument("--caps", required=True, help="folder of selection_harness captures")
    r.add_argument("--budgets", type=_budgets, default=[0.5, 0.25])
    p = sub.choices["passkey"]
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--depths", type=_budgets, default=[0.25, 0.5, 0.75])
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tail", type=int, default=16)
    p.add_argument("--skip", default="", help="seqtool and/or official: sides not to run")
    p.add_argument("--trace", default="", help="layer.head,...: record needle mass / kept share per decode call")
    p.add_argument("--official-first", action="store_true")
    rp = sub.add_parser("report", help="markdown tables from recall / passkey JSON files")
    rp.add_argument("--recall", type=Path, nargs="*", default=[])
    rp.add_argument("--passkey", type=Path, nargs="*", default=[])
    rp.add_argument("-o", "--out", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "report":
        cmd_report(args)
        return 0
    torch.set_num_threads(1)
    official.load(args.official)
    t0 = time.time()
    out = cmd_recall(args) if args.cmd == "recall" else cmd_passkey(args)
    commit = _commit(args.official)
    out.update({"official_repo": "DeepAuto-AI/hip-attention", "official_commit": commit,
                "official_function": "hip_attn.v1_0.attention1_block_gpu.hip_attention (TRITON_INTERPRET=1)",
                "seconds": round(time.time() - t0), "argv": sys.argv[1:]})
    args.out.write_text(json.dumps(out, indent=1))
    print("wrote", args.out)
    return 0


def _commit(path: str) -> str | None:
    f = Path(path) / "COMMIT"
    return f.read_text().strip() if f.exists() else None


if __name__ == "__main__":
    sys.exit(main())
