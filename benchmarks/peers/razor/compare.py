"""RazorAttention on ``ref``: which heads carry the passkey needle, and does any probe the paper describes find them?

No official RazorAttention code is public (searched GitHub code, issues and pages for the paper, arXiv 2407.15891,
Huawei 2024: no repository from the authors), so this compares seqtool's retrieval-head probe with the paper's
description instead. The paper protects *retrieval heads* = echo heads (attend the earlier occurrence of the current
token) + induction heads (attend the token that followed it), scored on a sequence of random tokens repeated, and
keeps the top ~15 % of heads (about 1 % echo + 14 % induction) with their full KV.

For each capture (``benchmarks/peers/selection_harness.py capture``): the answer query's attention mass on the needle
per head (the heads that carry it). For each probe: echo and induction score per head, the rank of every needle head,
and whether the paper's selection (top ``--induction-share`` by induction + top ``--echo-share`` by echo, at least
one each) or seqtool's (``razor.find_retrieval_heads``, top ``retrieval_share`` by induction, 64 random tokens x 2)
contains them.

    nice -n 10 python benchmarks/peers/razor/compare.py --caps /tmp/caps -o benchmarks/results/peers_razor
    # KV kept by seqtool's razor with given retrieval heads (one 2048-token passkey prompt, eval protocol):
    python benchmarks/peers/razor/compare.py --kv-heads 1.3,1.7,2.3,2.4,3.3 --budgets 0.1,0.25 \
        -o benchmarks/results/peers_razor_kv
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import selection_harness as sh  # noqa: E402


def echo_induction(model, ids: torch.Tensor, period: int, off: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, H)`` echo and induction scores: mean attention that queries of the 2nd.. copies of a ``period``-token
    block (starting at ``off``) give to the same token one period earlier (echo) and to the token after it
    (induction)."""
    from seqtool.arch.probe import attention_maps

    t = ids.shape[1]
    q = torch.arange(off + period, t - 1)
    echo, ind = [], []
    for att in attention_maps(model, ids):
        echo.append(att[:, :, q, q - period].mean((0, 2)))
        ind.append(att[:, :, q, q - period + 1].mean((0, 2)))
    return torch.stack(echo), torch.stack(ind)


def repeated(block: torch.Tensor, copies: int, bos: int | None) -> tuple[torch.Tensor, int]:
    ids = block.repeat(1, copies)
    if bos is not None:
        ids = torch.cat([torch.full((ids.shape[0], 1), bos, dtype=ids.dtype), ids], 1)
    return ids, int(bos is not None)


def top(scores: torch.Tensor, share: float) -> set[str]:
    n = max(1, int(round(share * scores.numel())))
    h = scores.shape[1]
    return {f"{i // h}.{i % h}" for i in torch.topk(scores.flatten(), n).indices.tolist()}


def rank_of(scores: torch.Tensor, head: str) -> int:
    layer, h = (int(x) for x in head.split("."))
    order = torch.argsort(scores.flatten(), descending=True).tolist()
    return order.index(layer * scores.shape[1] + h) + 1


def kv_kept(loaded, heads: list[str], budgets: list[float], tail: int = 16) -> list[dict]:
    """Bytes of KV seqtool's ``razor`` cache holds after one passkey prompt (prefill + ``tail`` steps) against a
    dense cache of the same tokens, per budget, with ``heads`` protected."""
    from seqtool.patches import apply_patch, make_cache

    s = sh.passkey_samples(loaded, 2048, [0.5], 1, 0)[0]
    ids = torch.tensor([s.input_ids])
    cfg = loaded.model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    dense = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * ids.shape[1] * d * 4
    rows = []
    for b in budgets:
        handle = apply_patch(loaded.model, "razor", budget=b, min_len=0, heads=tuple(heads))
        try:
            cache = make_cache(loaded.model)
            with torch.no_grad():
                loaded.model(ids[:, :-tail], cache=cache, use_cache=True)
                for j in range(ids.shape[1] - tail, ids.shape[1]):
                    loaded.model(ids[:, j:j + 1], cache=cache, use_cache=True)
            held = sum(layer.cache_bytes() for layer in cache.layers)
        finally:
            handle.remove()
        rows.append({"budget": b, "heads": heads, "kv_bytes": held, "dense_kv_bytes": dense,
                     "kept_fraction": round(held / dense, 4), "evicted": round(1 - held / dense, 4)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--caps", type=Path, default=Path("/tmp/caps"))
    ap.add_argument("--model", default="ref")
    ap.add_argument("--induction-share", type=float, default=0.14)
    ap.add_argument("--echo-share", type=float, default=0.01)
    ap.add_argument("--threshold", type=float, default=0.3, help="needle mass that makes a needle head")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv-heads", default=None, help="only measure the KV kept by razor with these heads")
    ap.add_argument("--budgets", default="0.1,0.25")
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.kv_heads:
        rows = kv_kept(sh.load_model(args.model), args.kv_heads.split(","), [float(x) for x in args.budgets.split(",")])
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
        return 0
    from seqtool.eval.runner import heldout_tokens
    from seqtool.patches.razor import find_retrieval_heads

    loaded = sh.load_model(args.model)
    model, cfg = loaded.model, loaded.model.config
    bos = cfg.bos_token_id if isinstance(getattr(cfg, "bos_token_id", None), int) else None
    result: dict = {"model": args.model, "needles": [], "probes": {}}

    needle: set[str] = set()
    for path in sorted(args.caps.glob("passkey-2048-*.pt")):
        cap = sh.load_capture(path)
        span = slice(cap["needle_pos"], cap["needle_pos"] + cap["needle_len"])
        mass = torch.stack([sh.dense_probs(cap, l)[:, 0, span].sum(-1) for l in sorted(cap["layers"])])
        heads = {f"{l}.{h}": round(float(mass[l, h]), 3) for l in range(mass.shape[0]) for h in range(mass.shape[1])
                 if mass[l, h] >= args.threshold}
        needle |= set(heads)
        result["needles"].append({"capture": path.name, "depth": cap["depth"], "needle_heads": heads,
                                  "mass_per_head": [[round(float(x), 3) for x in row] for row in mass]})
        print(path.name, heads, flush=True)
    needle_sorted = sorted(needle)
    result["needle_heads_union"] = needle_sorted

    gen = torch.Generator().manual_seed(0)
    low = 3 if cfg.vocab_size > 8 else 0
    text = torch.tensor(heldout_tokens(loaded.tokenizer)[:4096])
    probes = {
        "random 64 x 2, batch 4 (seqtool's probe)": (torch.randint(low, cfg.vocab_size, (4, 64), generator=gen), 2),
        "random 256 x 4, batch 2": (torch.randint(low, cfg.vocab_size, (2, 256), generator=gen), 4),
        "random 1023 x 2, batch 1 (trained length)": (torch.randint(low, cfg.vocab_size, (1, 1023), generator=gen), 2),
        "held-out text 512 x 2, batch 2": (text[:1024].view(2, 512), 2),
    }
    for name, (block, copies) in probes.items():
        ids, off = repeated(block, copies, bos)
        echo, ind = echo_induction(model, ids, block.shape[1], off)
        paper = top(ind, args.induction_share) | top(echo, args.echo_share)
        entry = {"max_echo": round(float(echo.max()), 3), "max_induction": round(float(ind.max()), 3),
                 "paper_selection": sorted(paper),
                 "needle_heads": {h: {"echo": round(float(echo[int(h.split('.')[0]), int(h.split('.')[1])]), 4),
                                      "induction": round(float(ind[int(h.split('.')[0]), int(h.split('.')[1])]), 4),
                                      "echo_rank": rank_of(echo, h), "induction_rank": rank_of(ind, h),
                                      "selected": h in paper} for h in needle_sorted},
                 "top5_induction": [[h, round(float(ind[int(h.split('.')[0]), int(h.split('.')[1])]), 4)]
                                    for h in [f"{i // ind.shape[1]}.{i % ind.shape[1]}"
                                              for i in torch.topk(ind.flatten(), 5).indices.tolist()]],
                 "top5_echo": [[h, round(float(echo[int(h.split('.')[0]), int(h.split('.')[1])]), 4)]
                               for h in [f"{i // echo.shape[1]}.{i % echo.shape[1]}"
                                         for i in torch.topk(echo.flatten(), 5).indices.tolist()]]}
        result["probes"][name] = entry
        print(name, json.dumps({k: entry[k] for k in ("max_echo", "max_induction", "paper_selection")}),
              {h: (v["echo_rank"], v["induction_rank"]) for h, v in entry["needle_heads"].items()}, flush=True)
    result["seqtool_find_retrieval_heads_0.15"] = list(find_retrieval_heads(model, 0.15))
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
