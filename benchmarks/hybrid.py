"""Decode cost of a `convert --to hybrid` model against its original, side by side, 1k -> 16k context (CPU).

    python benchmarks/hybrid.py --hybrid /tmp/hyref/mamba2            # ref vs its converted hybrid
    python benchmarks/hybrid.py --lengths 1k,2k --tokens 4 --out /tmp/hb.json   # smoke run

For every context length T, each model prefills T random tokens (use_cache) and then decodes ``--tokens`` tokens
one at a time; the row reports the median ms per decoded token and the bytes the cache holds after the prefill,
split into KV (attention layers) and recurrent state (conv + SSM state of the converted layers). The two models
are measured alternately at each length so that machine load hits both alike. Decode time does not depend on
the weights' values, so ``--hybrid`` may be an init-only conversion. Results: ``benchmarks/results/hybrid-cpu.json``
and ``.md`` (growth of decode time from the first to the last length, hybrid / original).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ref", help="the original (preset or directory)")
    p.add_argument("--hybrid", default=None, help="its hybrid; default: an init-only conversion keeping half the layers")
    p.add_argument("--lengths", default="1k,2k,4k,8k,16k")
    p.add_argument("--tokens", type=int, default=16, help="decoded tokens per length (median reported)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/hybrid-cpu.json"))
    return p.parse_args()


def _length(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0


def cache_bytes(cache, model) -> dict:
    """Bytes held per kind: ``kv`` (attention layers' keys/values) and ``state`` (everything a recurrent layer
    keeps), read from the cache object's layers."""
    from seqtool.arch.registry import attention_layer_indices

    attn = set(attention_layer_indices(model.config))
    out = {"kv": 0, "state": 0}
    for i, layer in enumerate(cache.layers):
        out["kv" if i in attn else "state"] += sum(_tensor_bytes(v) for v in vars(layer).values())
    out["total"] = out["kv"] + out["state"]
    return out


@torch.no_grad()
def measure(model, length: int, tokens: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, model.config.vocab_size, (1, length), generator=gen)
    started = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - started
    cache = out.past_key_values
    sizes = cache_bytes(cache, model)
    nxt = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(tokens):
        t = time.perf_counter()
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - t)
        cache = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
    return {"prefill_s": round(prefill, 3), "decode_ms_per_token": round(1000 * statistics.median(times), 3),
            "cache_bytes": sizes}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    import seqtool

    original = seqtool.load(args.model, device="cpu", dtype="fp32").model
    if args.hybrid:
        hybrid = seqtool.load(args.hybrid, device="cpu", dtype="fp32").model
        hybrid_name = args.hybrid
    else:
        n = original.config.num_hidden_layers
        hybrid = seqtool.convert(args.model, "hybrid", attention_layers=list(range(n // 2, n)), steps1=0,
                                 steps2=0, dtype="fp32", device="cpu").model
        hybrid_name = f"{args.model} init-only, attention layers {list(range(n // 2, n))}"
    original.eval()
    hybrid.eval()
    rows = []
    for text in args.lengths.split(","):
        length = _length(text)
        for name, model in (("original", original), ("hybrid", hybrid)):
            measure(model, 64, 2)  # warm-up
            row = {"model": name, "context": length, **measure(model, length, args.tokens)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    first, last = rows[0]["context"], rows[-1]["context"]

    def growth(name: str) -> float:
        get = {r["context"]: r["decode_ms_per_token"] for r in rows if r["model"] == name}
        return get[last] - get[first]

    g_orig, g_hyb = growth("original"), growth("hybrid")
    state = [r["cache_bytes"]["state"] for r in rows if r["model"] == "hybrid"]
    summary = {"original": args.model, "hybrid": hybrid_name, "threads": args.threads, "tokens": args.tokens,
               "decode_growth_ms": {"original": round(g_orig, 3), "hybrid": round(g_hyb, 3)},
               "growth_ratio": round(g_hyb / g_orig, 3) if g_orig > 0 else None,
               "recurrent_state_bytes_constant": len(set(state)) == 1, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"# hybrid decode cost (CPU, {args.threads} thread(s), median of {args.tokens} decoded tokens)", "",
             f"original: `{args.model}`; hybrid: `{hybrid_name}`", "",
             "| context | model | decode ms/token | KV bytes | recurrent state bytes | total cache bytes | prefill s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["cache_bytes"]
        lines.append(f"| {r['context']} | {r['model']} | {r['decode_ms_per_token']} | {c['kv']} | {c['state']} | "
                     f"{c['total']} | {r['prefill_s']} |")
    lines += ["", f"decode-time growth {first} -> {last} tokens: original {g_orig:.3f} ms, hybrid {g_hyb:.3f} ms "
                  f"(ratio {summary['growth_ratio']}); recurrent state constant in context: "
                  f"{summary['recurrent_state_bytes_constant']}"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
