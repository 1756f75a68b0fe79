"""SnapKV: the official selection (FasterDecoding/SnapKV ``SnapKVCluster.update_kv``) against seqtool's ``snapkv`` on
the same captured passkey prompts of ``ref`` (issue 17).

The official function is imported from a checkout outside the repo and called unchanged on the captured post-RoPE
``q``/``k``; to learn *which* keys it kept, its ``value_states`` argument carries each token's position in every
channel (the function gathers keys and values with the same indices), so the returned values are the kept positions.
Parameters matched to a budget ``b``: ``max_capacity_prompt = ceil(b * prompt length)`` (window included, as
seqtool's ``budget.tokens``), ``window_size=32``, ``kernel_size=5``, ``pooling='avgpool'`` (``init_snapkv``'s
defaults) and ``kernel_size=7, pooling='maxpool'`` (the LongBench configs); seqtool at its defaults
(``window=32,kernel=5,pool=max``), with ``pool=avg`` and with ``kernel=7``: with the same parameters the kept sets
must be the same keys (``differing_keys_official_vs_seqtool_same_params``).

Two protocols (see ``evict_harness.py``): ``tail=16`` (seqtool eval: the question is fed after compression, outside
the window) and ``tail=0`` (the official pipeline: whole prompt prefilled, question inside the window).

    git --git-dir=/work/.mirror/FasterDecoding+SnapKV/repo archive HEAD | tar -x -C /tmp/snapkv-official
    git --git-dir=/work/.mirror/FasterDecoding+SnapKV/repo rev-parse HEAD > /tmp/snapkv-official/COMMIT
    nice -n 10 python benchmarks/peers/snapkv/compare.py --official /tmp/snapkv-official --caps /tmp/caps \
        --samples 5 -o benchmarks/results/peers_snapkv
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evict_harness as eh  # noqa: E402

sh = eh.sh
WINDOW, KERNEL = 32, 5


def official_select(mod, q: torch.Tensor, k: torch.Tensor, capacity: int, window: int = WINDOW,
                    kernel: int = KERNEL, pooling: str = "avgpool") -> torch.Tensor:
    """Kept positions ``(H, n)`` chosen by the official ``SnapKVCluster.update_kv`` on ``q``/``k`` ``(H, T, D)``."""
    h, t, d = k.shape
    if q.shape[0] != h:
        raise SystemExit("the official update_kv matmuls q with k unrepeated: MHA captures only")
    cluster = mod.SnapKVCluster(window_size=window, max_capacity_prompt=capacity, kernel_size=kernel, pooling=pooling)
    tags = torch.arange(t, dtype=torch.float32)[None, None, :, None].expand(1, h, t, d).clone()
    _, kept = cluster.update_kv(k[None].float(), q[None].float(), tags, None, 1)
    return kept[0, :, :, 0].round().long()


def seqtool_select(q: torch.Tensor, k: torch.Tensor, capacity: int, window: int = WINDOW, kernel: int = KERNEL,
                   pool: str = "max") -> torch.Tensor:
    """Kept positions ``(Hkv, n)`` of seqtool's ``snapkv`` after a prefill of ``q``/``k``: its ``window_scores``
    and the ranking of ``EvictingCacheLayer.evict_to`` (window protected, stable top-``capacity``)."""
    from seqtool.patches.snapkv import window_scores

    hkv, t, d = k.shape
    call = SimpleNamespace(q=q[None], k=k[None], scale=d ** -0.5, n_rep=q.shape[0] // hkv, tq=t, tk=t)
    score = window_scores(call, window, kernel, pool)[0]
    if capacity >= t:
        return torch.arange(t).expand(hkv, t)
    pos = torch.arange(t, dtype=torch.float32)
    rank = torch.where(pos >= t - window, 1e30 * (1 + pos / t), score.float())
    return torch.sort(rank, dim=-1, descending=True, stable=True).indices[:, :capacity]


def capacity(budget: float, prompt: int) -> int:
    return max(1, min(prompt, math.ceil(budget * prompt)))


def selectors(mod) -> dict[str, callable]:
    """name -> (q, k, capacity) -> kept ``(H, n)``."""
    return {
        "official (avgpool k5 w32)": lambda q, k, c: official_select(mod, q, k, c),
        "official (maxpool k7 w32, LongBench configs)": lambda q, k, c: official_select(mod, q, k, c, kernel=7,
                                                                                         pooling="maxpool"),
        "seqtool (defaults: max k5 w32)": lambda q, k, c: seqtool_select(q, k, c),
        "seqtool pool=avg": lambda q, k, c: seqtool_select(q, k, c, pool="avg"),
        "seqtool kernel=7 (max)": lambda q, k, c: seqtool_select(q, k, c, kernel=7),
    }


#: (official, seqtool) selections built with the same parameters: their kept sets must be the same keys.
SAME = (("official (avgpool k5 w32)", "seqtool pool=avg", 5, "avg"),
        ("official (maxpool k7 w32, LongBench configs)", "seqtool kernel=7 (max)", 7, "max"))


def untied_differences(q, k, a, b, capacity_: int, kernel: int, pool: str) -> int:
    """Keys in exactly one of the kept sets ``a`` / ``b`` ``(H, n)`` whose score differs from the score at the cut
    (0: the sets differ only in how ties at the cut were broken: ``torch.topk`` vs seqtool's stable sort)."""
    from seqtool.patches.snapkv import window_scores

    t = k.shape[1]
    call = SimpleNamespace(q=q[None], k=k[None], scale=k.shape[-1] ** -0.5, n_rep=q.shape[0] // k.shape[0], tq=t, tk=t)
    sc = window_scores(call, WINDOW, kernel, pool)[0, :, : t - WINDOW]
    n = 0
    for h in range(k.shape[0]):
        cut = torch.topk(sc[h], capacity_ - WINDOW).values[-1]
        d = (eh.positions_mask(a[h:h + 1], t) ^ eh.positions_mask(b[h:h + 1], t))[0].nonzero().flatten()
        n += int((sc[h, d[d < t - WINDOW]] != cut).sum()) + int((d >= t - WINDOW).sum())
    return n


def capture_rows(cap: dict, mod, budgets: list[float], tails: list[int], loaded) -> list[dict]:
    """Per capture, budget and protocol: each selection's needle / answer recall on the needle heads and the mean
    over all heads, its overlap with seqtool's, and the check that the replica equals seqtool's real cache."""
    t = len(cap["input_ids"])
    heads = sh.needle_heads(cap)
    rows = []
    for tail in tails:
        plen = t - tail
        for b in budgets:
            c = capacity(b, plen)
            real = eh.seqtool_cache_kept(loaded, cap["input_ids"][:plen], "snapkv", budget=b)
            row = {"depth": cap["depth"], "tail": tail, "budget": b, "capacity": c, "prompt": plen,
                   "needle_heads": [f"{l}.{h}" for l, h, _ in heads], "selections": {}}
            check = []
            kept_all = {}
            for name, fn in selectors(mod).items():
                per_layer = {}
                for layer, e in cap["layers"].items():
                    kept = fn(e["q"][:, :plen], e["k"][:, :plen], c)
                    tailpos = torch.arange(plen, t).expand(kept.shape[0], tail)
                    per_layer[layer] = torch.cat([kept, tailpos], 1)
                kept_all[name] = per_layer
            ref_name = "seqtool (defaults: max k5 w32)"
            for layer in cap["layers"]:
                rp = torch.cat([real[layer], torch.arange(plen, t).expand(real[layer].shape[0], tail)], 1)
                check.append(float(eh.overlap(kept_all[ref_name][layer], rp, t).min()))
            row["replica_vs_seqtool_cache_min_overlap"] = min(check)
            row["differing_keys_official_vs_seqtool_same_params"] = {
                f"{a} vs {b}": sum(int((eh.positions_mask(kept_all[a][l], t) ^ eh.positions_mask(kept_all[b][l], t))
                                       .sum()) for l in cap["layers"]) for a, b, _, _ in SAME}
            row["untied_differing_keys"] = {
                f"{a} vs {b}": sum(untied_differences(e["q"][:, :plen], e["k"][:, :plen], kept_all[a][l][:, :c],
                                                      kept_all[b][l][:, :c], c, kk, pp)
                                   for l, e in cap["layers"].items()) if c < plen else 0 for a, b, kk, pp in SAME}
            row["selections"] = eh.selection_scores(cap, kept_all, ref_name, heads)
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("depth", "tail", "budget", "replica_vs_seqtool_cache_min_overlap",
                                                   "differing_keys_official_vs_seqtool_same_params",
                                                   "untied_differing_keys")}),
                  {n: (s["needle_recall"], s["mean_answer_recall"]) for n, s in row["selections"].items()}, flush=True)
    return rows


def main(argv=None) -> int:
    ap = eh.comparison_args(__doc__.split("\n")[0], "FasterDecoding/SnapKV")
    ap.add_argument("--passkey-selections", default="official (avgpool k5 w32),seqtool (defaults: max k5 w32)")
    args = ap.parse_args(argv)
    mod, budgets, tails, loaded, result = eh.comparison_setup(
        args, "FasterDecoding/SnapKV", "snapkv/monkeypatch/snapkv_utils.py", "snapkv_official",
        "SnapKVCluster.update_kv")
    for path in sorted(args.caps.glob("passkey-2048-*.pt")):
        result["captures"] += capture_rows(sh.load_capture(path), mod, budgets, tails, loaded)
    if args.samples:
        samples = sh.passkey_samples(loaded, 2048, [0.25, 0.5, 0.75], args.samples, 0)
        sels = selectors(mod)

        def selector(fn, b):
            return eh.KeptSetSelector(lambda layer, q, k: fn(q, k, capacity(b, q.shape[1])))

        eh.passkey_rows(loaded, {name: (lambda b, fn=sels[name]: selector(fn, b))
                                 for name in args.passkey_selections.split(",")},
                        budgets, tails, samples, result, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
