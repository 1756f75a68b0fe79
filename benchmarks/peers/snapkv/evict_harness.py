"""Shared plumbing for the KV-eviction comparisons (``snapkv``, ``h2o``) with their official code (issue 17).

An eviction method is a *kept set* per layer and KV head that changes over time: dense prefill, then the cache
holds only the kept keys (plus, for SnapKV, every later token; H2O re-selects after every step). The harness in
``benchmarks/peers/selection_harness.py`` gives each attention call ``(layer, q, k)`` over the *full* KV;
:class:`KeptSetSelector` turns a kept-set policy into the keep mask of each call, so the official function and
seqtool's selection are plugged into the same model, prompts and decode protocol:

- ``tail=16`` (seqtool's eval protocol): prefill the prompt minus its last 16 tokens (the question is there),
  then feed those 16 one at a time: SnapKV's observation window is filler ("question outside the window").
- ``tail=0`` (the official code's protocol, :func:`answer_full_prefill`): prefill the whole prompt (question
  inside the window); the first answer token comes from the dense prefill, the rest attend the kept set.

Shapes: ``H`` heads (``ref`` is MHA), ``T`` tokens, ``D`` head dim.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/peers
import selection_harness as sh  # noqa: E402

#: ``(layer, q (Hq, T, D), k (Hkv, T, D)) -> kept positions (Hkv, n)`` chosen after a dense prefill of T tokens.
PrefillPolicy = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
#: ``(layer, q (Hq, tq, D), k (Hkv, tk, D) full KV, kept (Hkv, n)) -> kept after this step`` (``None``: keep
#: everything attended, i.e. ``kept`` plus the new tokens).
DecodePolicy = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def positions_mask(kept: torch.Tensor, length: int) -> torch.Tensor:
    """``kept`` ``(H, n)`` long positions → bool ``(H, length)``."""
    out = torch.zeros(kept.shape[0], length, dtype=torch.bool)
    return out.scatter_(1, kept.clamp(max=length - 1), True)


class KeptSetSelector:
    """A :data:`selection_harness.Selector` that keeps per layer the KV positions a policy chose.

    The prefill call (``tq == tk > 1``, no past) runs dense and asks ``prefill`` for the kept set; every later
    call attends the kept set plus its own new tokens, then ``decode`` (optional) updates the kept set."""

    def __init__(self, prefill: PrefillPolicy, decode: DecodePolicy | None = None):
        self.prefill, self.decode = prefill, decode
        self.kept: dict[int, torch.Tensor] = {}

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor):
        tq, tk = q.shape[2], k.shape[2]
        if tq == tk and tq > 1:  # a new prompt
            self.kept[layer] = self.prefill(layer, q[0], k[0]).long()
            return None
        kept = self.kept[layer]
        hkv, g = k.shape[1], q.shape[1] // k.shape[1]
        new = torch.arange(tk - tq, tk).expand(hkv, tq)
        attended = torch.cat([kept, new], 1)
        keep = positions_mask(attended, tk)
        nxt = self.decode(layer, q[0], k[0], attended) if self.decode is not None else None
        self.kept[layer] = attended if nxt is None else nxt.long()
        return keep.repeat_interleave(g, 0)[None, :, None, :].expand(1, q.shape[1], tq, tk)


def answer_full_prefill(loaded, samples, selector) -> list[bool]:
    """The official protocol: prefill each whole prompt (dense; the selector picks its kept set), then answer
    greedily with every later step restricted to ``selector``; exact-match hits."""
    import inspect

    from transformers import DynamicCache

    from seqtool.eval.scoring import exact_match, stop_token_ids

    model, tok = loaded.model, loaded.tokenizer
    ckw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    stops = stop_token_ids(tok)
    hits = []
    with sh._selection_attention(model, selector), torch.no_grad():
        for s in samples:
            cache = DynamicCache(config=model.config)
            out = model(torch.tensor([s.input_ids]), use_cache=True, **{ckw: cache})
            gen: list[int] = []
            for _ in range(len(s.answer_ids) + 4):
                nxt = int(out.logits[0, -1].float().argmax())
                gen.append(nxt)
                if nxt in stops:
                    break
                out = model(torch.tensor([[nxt]]), use_cache=True, **{ckw: cache})
            hits.append(bool(exact_match(tok.decode(gen, skip_special_tokens=True), s.answer)))
    return hits


def passkey(loaded, samples, selector, tail: int) -> list[bool]:
    """Hits of ``selector`` under the given protocol (``tail=0``: official full prefill; else seqtool's)."""
    if tail == 0:
        return answer_full_prefill(loaded, samples, selector)
    return sh.passkey_with_selector(loaded, samples, selector, tail=tail)


def seqtool_cache_kept(loaded, ids: list[int], method: str, **options) -> dict[int, torch.Tensor]:
    """Run seqtool's own ``method`` (patch + cache layer) on the prompt ``ids`` (one forward, as its prefill) and
    read back what each layer's cache kept: ``{layer: (Hkv, n) positions}``. The ground truth for checking that a
    re-implemented seqtool selector in this script is seqtool's selection."""
    from seqtool.patches import apply_patch, make_cache

    handle = apply_patch(loaded.model, method, min_len=0, **options)
    try:
        cache = make_cache(loaded.model)
        with torch.no_grad():
            loaded.model(torch.tensor([ids]), cache=cache, use_cache=True)
        out = {}
        for i, layer in enumerate(cache.layers):
            start = int(layer.kv_start[0]) if getattr(layer, "kv_start", None) is not None else 0
            pos = layer.head_pos[0, :, start:] - (int(layer.origin[0]) if layer.origin is not None else 0)
            out[i] = pos.long()
        return out
    finally:
        handle.remove()


def overlap(a: torch.Tensor, b: torch.Tensor, length: int) -> torch.Tensor:
    """``(H,)`` Jaccard overlap of two kept position sets ``(H, n)``."""
    return sh.kept_overlap(positions_mask(a, length), positions_mask(b, length))


def load_official(path: Path, rel: str, name: str):
    """Import one module of an official checkout by file path (no package install)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def git_head(path: Path) -> str:
    """The official checkout's commit, recorded in ``COMMIT`` next to it by the comparison's setup command."""
    f = path / "COMMIT"
    return f.read_text().strip() if f.exists() else "unknown"


def comparison_args(description: str, repo: str):
    """The command line both eviction comparisons take (``--official`` checkout of ``repo``, captures, budgets,
    protocols by tail, passkey prompts per depth, threads, output stem); returns the ``ArgumentParser``."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--official", type=Path, required=True, help=f"checkout of {repo}")
    ap.add_argument("--caps", type=Path, default=Path("/tmp/caps"))
    ap.add_argument("--budgets", default="0.1,0.25,0.5")
    ap.add_argument("--tails", default="16,0")
    ap.add_argument("--samples", type=int, default=1, help="passkey prompts per depth (0: skip passkey)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--out", type=Path, required=True, help="output stem (.json is written)")
    return ap


def comparison_setup(args, repo: str, rel: str, name: str, function: str):
    """(official module, budgets, tails, loaded ``ref``, result dict) for a comparison's ``args``."""
    torch.set_num_threads(args.threads)
    mod = load_official(args.official, rel, name)
    budgets = [float(x) for x in args.budgets.split(",")]
    tails = [int(x) for x in args.tails.split(",")]
    result = {"official_repo": repo, "official_commit": git_head(args.official),
              "official_function": f"{rel}: {function}", "captures": [], "passkey": []}
    return mod, budgets, tails, sh.load_model("ref"), result


def passkey_rows(loaded, selections, budgets, tails, samples, result: dict, out: Path) -> None:
    """Passkey of every ``selections`` entry (``name -> make(budget) -> KeptSetSelector``) per tail and budget,
    appended to ``result["passkey"]`` and written to ``out`` (.json) after each row."""
    import json
    import time

    for tail in tails:
        for b in budgets:
            for name, make in selections.items():
                t0 = time.time()
                hits = passkey(loaded, samples, make(b), tail)
                row = {"selection": name, "tail": tail, "budget": b, "passkey": sum(hits) / len(hits),
                       "hits": hits, "n": len(hits), "s": round(time.time() - t0)}
                result["passkey"].append(row)
                print(json.dumps(row), flush=True)
                out.with_suffix(".json").write_text(json.dumps(result, indent=1))


def selection_scores(cap: dict, kept_all: dict, reference: str, heads) -> dict:
    """Per selection (``name -> {layer: (H, n) kept positions}``): needle recall, answer recall and overlap with
    ``reference``'s kept set on each needle head (``(layer, head, mass)``), plus the means over every head."""
    t = len(cap["input_ids"])
    out = {}
    for name, per_layer in kept_all.items():
        nr, ar, ov, mean_nr, mean_ar = {}, {}, {}, [], []
        for layer, kept in per_layer.items():
            keep = positions_mask(kept, t)
            n, a = sh.needle_recall(cap, layer, keep), sh.answer_recall(cap, layer, keep)
            o = overlap(kept, kept_all[reference][layer], t)
            mean_nr.append(n.mean())
            mean_ar.append(a.mean())
            for hh in (h for ll, h, _ in heads if ll == layer):
                key = f"{layer}.{hh}"
                nr[key], ar[key], ov[key] = round(float(n[hh]), 3), round(float(a[hh]), 3), round(float(o[hh]), 3)
        out[name] = {"needle_recall": nr, "answer_recall": ar, "overlap_with_seqtool": ov,
                     "mean_needle_recall": round(float(torch.stack(mean_nr).mean()), 3),
                     "mean_answer_recall": round(float(torch.stack(mean_ar).mean()), 3)}
    return out
