"""H2O: the official heavy-hitter cache (FMInference/H2O ``H2OKVCache_LayerWise``, ``h2o_hf/utils_real_drop``) against
seqtool's ``h2o`` on the same captured passkey prompts of ``ref`` (issue 17).

The official class is imported from a checkout outside the repo and driven exactly as its ``H2OLlamaAttention``
drives it: after every attention call, ``kv_cache((k, v), attn_weights)`` accumulates the softmax attention each
cached key received (summed over the call's queries) and, once the cache exceeds ``hh_size + recent_size``, keeps
the ``recent_size`` latest entries plus the ``hh_size`` highest accumulated scores of the rest. To learn which
keys it kept, the ``v`` it is handed carries each token's position in every channel (keys and values are selected
with the same mask). Parameters matched to a budget ``b``: ``cache = ceil(b * prompt length)``,
``recent_size = ceil(cache / 2)``, ``hh_size = cache - recent_size`` (the official scripts split ``heavy_ratio =
recent_ratio``; seqtool's default ``recent=0.5``). The official cache has no sink tokens; seqtool protects 4.

    git --git-dir=/work/.mirror/FMInference+H2O/repo archive HEAD h2o_hf/utils_real_drop | tar -x -C /tmp/h2o-official
    git --git-dir=/work/.mirror/FMInference+H2O/repo rev-parse HEAD > /tmp/h2o-official/COMMIT
    nice -n 10 python benchmarks/peers/h2o/compare.py --official /tmp/h2o-official --caps /tmp/caps --samples 5 \
        -o benchmarks/results/peers_h2o
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "snapkv"))
import evict_harness as eh  # noqa: E402

sh = eh.sh


def sizes(budget: float, prompt: int, recent: float = 0.5) -> tuple[int, int]:
    """(cache entries, recent entries) per head for ``budget`` of a ``prompt``-token prompt."""
    c = max(1, min(prompt, math.ceil(budget * prompt)))
    return c, math.ceil(c * recent)


def causal_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``(1, H, tq, tk)`` softmax attention of ``q`` ``(H, tq, D)`` over ``k`` ``(H, tk, D)``, queries end-aligned."""
    tq, tk = q.shape[1], k.shape[1]
    s = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    qpos = torch.arange(tk - tq, tk)[:, None]
    s = s.masked_fill(torch.arange(tk)[None, :] > qpos, float("-inf"))
    return torch.softmax(s, -1)[None]


class OfficialH2O:
    """Per-layer official ``H2OKVCache_LayerWise`` instances behind :class:`evict_harness.KeptSetSelector`."""

    def __init__(self, mod, budget: float):
        self.mod, self.budget = mod, budget
        self.caches: dict[int, object] = {}

    def _run(self, layer: int, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Attention of ``q`` over the cache ``k[pos]`` (``pos`` (H, n)), then the official update; kept positions."""
        h, d = k.shape[0], k.shape[-1]
        kc = torch.gather(k, 1, pos[..., None].expand(h, pos.shape[1], d))
        tags = pos.float()[..., None].expand(h, pos.shape[1], d).clone()
        out = self.caches[layer]((kc[None], tags[None]), causal_probs(q, kc))
        return out[1][0, :, :, 0].round().long()

    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        c, r = sizes(self.budget, k.shape[1])
        with contextlib.redirect_stdout(io.StringIO()):  # the class prints its sizes
            self.caches[layer] = self.mod.H2OKVCache_LayerWise(hh_size=c - r, recent_size=r)
        return self._run(layer, q, k, torch.arange(k.shape[1]).expand(k.shape[0], -1))

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        return self._run(layer, q, k, attended)


class SeqtoolH2O:
    """seqtool's ``h2o`` selection replayed on full q/k: ``attention_mass`` scores (prefill: every query), sinks +
    recent window protected, top accumulated score for the rest (``H2OCacheLayer.after_attention`` /
    ``EvictingCacheLayer.evict_to``); budget fixed from the prompt length."""

    def __init__(self, budget: float, sinks: int = 4, recent: float = 0.5):
        self.budget, self.sinks, self.recent = budget, sinks, recent
        self.state: dict[int, tuple[torch.Tensor, int, int]] = {}  # layer -> (scores of the kept (H, n), c, r)

    def _evict(self, layer: int, pos: torch.Tensor, score: torch.Tensor, seen: int) -> torch.Tensor:
        _, c, r = self.state[layer]
        if pos.shape[1] <= c:
            self.state[layer] = (score, c, r)
            return pos
        protect = (pos < self.sinks) | (pos >= seen - r)
        later = 1e30 * (1 + pos.float() / seen)
        rank = torch.where(protect, later, score)
        top = torch.sort(rank, dim=-1, descending=True, stable=True).indices[:, :c]
        top = top.sort(-1).values  # kept slots stay in original order
        self.state[layer] = (torch.gather(score, 1, top), c, r)
        return torch.gather(pos, 1, top)

    def prefill(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        from seqtool.patches._evict import attention_mass

        c, r = sizes(self.budget, k.shape[1], self.recent)
        self.state[layer] = (None, c, r)
        score = attention_mass(q[None], k[None], k.shape[-1] ** -0.5, q.shape[0] // k.shape[0])[0]
        return self._evict(layer, torch.arange(k.shape[1]).expand(k.shape[0], -1), score, k.shape[1])

    def decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        old, c, r = self.state[layer]
        h, d = k.shape[0], k.shape[-1]
        kc = torch.gather(k, 1, attended[..., None].expand(h, attended.shape[1], d))
        mass = causal_probs(q, kc)[0].sum(1)  # (H, n + tq)
        score = mass.clone()
        score[:, : old.shape[1]] += old
        return self._evict(layer, attended, score, k.shape[1])


def replay_capture(policy, cap: dict, tail: int) -> dict[int, torch.Tensor]:
    """Kept positions per layer after the whole prompt under ``policy``: prefill of ``T - tail`` tokens, then the
    tail one token at a time (the captured dense q/k stand in for the tail's)."""
    t = len(cap["input_ids"])
    out = {}
    for layer, e in cap["layers"].items():
        plen = t - tail
        kept = policy.prefill(layer, e["q"][:, :plen], e["k"][:, :plen])
        for j in range(plen, t):
            new = torch.full((kept.shape[0], 1), j)
            attended = torch.cat([kept, new], 1)
            kept = policy.decode(layer, e["q"][:, j:j + 1], e["k"][:, :j + 1], attended)
        out[layer] = kept
    return out


def capture_rows(cap: dict, mod, budgets: list[float], tails: list[int], loaded) -> list[dict]:
    t = len(cap["input_ids"])
    heads = sh.needle_heads(cap)
    rows = []
    for tail in tails:
        for b in budgets:
            plen = t - tail
            # the replica's prefill against seqtool's real cache after its prefill
            real = eh.seqtool_cache_kept(loaded, cap["input_ids"][:plen], "h2o", budget=b)
            rep = SeqtoolH2O(b)
            check = min(float(eh.overlap(rep.prefill(l, e["q"][:, :plen], e["k"][:, :plen]), real[l], plen).min())
                        for l, e in cap["layers"].items())
            kept_all = {"official (H2OKVCache_LayerWise)": replay_capture(OfficialH2O(mod, b), cap, tail),
                        "seqtool (defaults: sinks=4, recent=0.5)": replay_capture(SeqtoolH2O(b), cap, tail)}
            ref_name = "seqtool (defaults: sinks=4, recent=0.5)"
            row = {"depth": cap["depth"], "tail": tail, "budget": b, "cache": sizes(b, plen)[0], "prompt": plen,
                   "needle_heads": [f"{l}.{h}" for l, h, _ in heads],
                   "replica_vs_seqtool_cache_min_overlap_after_prefill": check, "selections": {}}
            row["selections"] = eh.selection_scores(cap, kept_all, ref_name, heads)
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("depth", "tail", "budget",
                                                   "replica_vs_seqtool_cache_min_overlap_after_prefill")}),
                  {n: (s["needle_recall"], s["mean_answer_recall"]) for n, s in row["selections"].items()}, flush=True)
    return rows


def main(argv=None) -> int:
    ap = eh.comparison_args(__doc__.split("\n")[0], "FMInference/H2O")
    args = ap.parse_args(argv)
    mod, budgets, tails, loaded, result = eh.comparison_setup(
        args, "FMInference/H2O", "h2o_hf/utils_real_drop/modify_llama.py", "h2o_official",
        "H2OKVCache_LayerWise.__call__")
    for path in sorted(args.caps.glob("passkey-2048-*.pt")):
        result["captures"] += capture_rows(sh.load_capture(path), mod, budgets, tails, loaded)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    if args.samples:
        samples = sh.passkey_samples(loaded, 2048, [0.25, 0.5, 0.75], args.samples, 0)
        def policy_selector(policy):
            return eh.KeptSetSelector(policy.prefill, policy.decode)

        eh.passkey_rows(loaded, {"official (H2OKVCache_LayerWise)": lambda b: policy_selector(OfficialH2O(mod, b)),
                                 "seqtool (defaults: sinks=4, recent=0.5)": lambda b: policy_selector(SeqtoolH2O(b))},
                        budgets, tails, samples, result, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
