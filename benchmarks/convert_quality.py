"""Quality and speed of `seqtool convert --to gqa` and `seqtool prune` on one model (default: `ref`).

Regenerates the tables in docs/convert.md (between the `convert-quality` markers) from a JSON cache of rows:

    python benchmarks/convert_quality.py                 # ref, resumable; run it in the background
    python benchmarks/convert_quality.py --render-only   # rebuild the markdown from the cache
    python benchmarks/convert_quality.py --model tiny-llama --samples 2 --seq-len 256 --ppl-tokens 2048 \
        --recover-steps 4 --cache /tmp/cq.json --doc /tmp/cq.md                     # smoke run (minutes)

Rows: the original; GQA to every divisor of the KV-head count with `mean` and `key` grouping; pruning at 0.1, 0.2,
0.3 with `amp`, `magnitude` and `random` (seeds 0, 1, 2; the table shows their mean), each before and after LoRA
recovery. Metrics: sliding-window perplexity on held-out text and passkey / multikey exact-match accuracy (mean
over depths). Each row is written to the cache as soon as it is done, so a rerun skips finished rows. Finally
`seqtool.profile` compares the original with pruned-0.3 (amp) and with GQA (kv/4, key) on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MARK_BEGIN, MARK_END = "<!-- convert-quality:begin -->", "<!-- convert-quality:end -->"
RATIOS = (0.1, 0.2, 0.3)
CRITERIA = ("amp", "magnitude", "random")
RANDOM_SEEDS = (0, 1, 2)
TASKS = ("ppl", "passkey", "multikey")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ref")
    p.add_argument("--cache", default=str(ROOT / "benchmarks/results/convert_quality.json"))
    p.add_argument("--doc", default=str(ROOT / "docs/convert.md"))
    p.add_argument("--work-dir", default="/tmp/seqtool-convert-bench", help="where compared checkpoints are saved")
    p.add_argument("--seq-len", type=int, default=1024, help="eval length (ppl windows and task prompts)")
    p.add_argument("--samples", type=int, default=8, help="prompts per task and depth")
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--ppl-tokens", type=int, default=16384)
    p.add_argument("--calib-samples", type=int, default=50)
    p.add_argument("--calib-seq-len", type=int, default=128)
    p.add_argument("--recover-steps", type=int, default=100)
    p.add_argument("--profile-seq-len", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=("gqa", "prune", "profile"), action="append")
    p.add_argument("--render-only", action="store_true")
    return p.parse_args()


class Cache:
    """Row results keyed by id, rewritten atomically after every row."""

    def __init__(self, path: Path, settings: dict, *, check: bool = True):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}
        if check and self.data.get("settings") not in (None, settings):
            log(f"{path} was made with other settings or weights ({self.data['settings']}): cached rows dropped")
            self.data = {}
        self.data.setdefault("settings", settings)
        self.data.setdefault("rows", {})

    def __contains__(self, key: str) -> bool:
        return key in self.data["rows"]

    def __getitem__(self, key: str) -> dict:
        return self.data["rows"][key]

    def put(self, key: str, value: dict) -> None:
        self.data["rows"][key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def evaluate_row(model, tokenizer, args) -> dict:
    import seqtool

    t0 = time.time()
    res = seqtool.evaluate(model, list(TASKS), tokenizer=tokenizer, seq_lens=(args.seq_len,), samples=args.samples,
                           depths=[float(d) for d in args.depths.split(",")], ppl_tokens=args.ppl_tokens,
                           device="cpu")
    out = {"ppl": res.ppl[0].ppl if res.ppl else None}
    for task in TASKS[1:]:
        accs = [s.accuracy for s in res.scores if s.task == task]
        out[task] = sum(accs) / len(accs) if accs else None
    out["eval_s"] = round(time.time() - t0, 1)
    return out


def load(args):
    from seqtool.arch.io import load_model

    return load_model(args.model, device="cpu", dtype="fp32")


def calib_options(args) -> dict:
    return {"samples": args.calib_samples, "seq_len": args.calib_seq_len}


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def run_gqa(args, cache: Cache) -> None:
    import seqtool

    kv = load(args).model.config.num_key_value_heads
    for n in [d for d in range(kv - 1, 0, -1) if kv % d == 0]:
        for grouping in ("mean", "key"):
            key = f"gqa/{grouping}/{n}"
            if key in cache:
                continue
            log(f"{key} ...")
            res = seqtool.convert(load(args), "gqa", kv_heads=n, grouping=grouping, **calib_options(args))
            cache.put(key, {**evaluate_row(res.model, res.tokenizer, args), "kv_heads": n,
                            "kv_bytes_per_token": res.after.kv_cache_bytes_per_token})


def run_prune(args, cache: Cache) -> None:
    import seqtool
    from seqtool.convert.recover import recover

    for ratio in RATIOS:
        for criterion in CRITERIA:
            for seed in (RANDOM_SEEDS if criterion == "random" else (0,)):
                base = f"prune/{criterion}/{ratio}/seed{seed}"
                if f"{base}/none" in cache and f"{base}/lora" in cache:
                    continue
                log(f"{base} ...")
                res = seqtool.prune(load(args), ratio, criterion=criterion, seed=seed, **calib_options(args))
                shape = {"removed_ratio": res.removed_ratio, "heads": res.after.heads,
                         "intermediate": res.after.intermediate}
                if f"{base}/none" not in cache:
                    cache.put(f"{base}/none", {**evaluate_row(res.model, res.tokenizer, args), **shape})
                rec = recover(res.model, res.tokenizer, "lora", kinds=("attention", "mlp"), steps=args.recover_steps,
                              seed=seed)
                cache.put(f"{base}/lora", {**evaluate_row(res.model, res.tokenizer, args), **shape,
                                           "loss_start": rec.loss_start, "loss_end": rec.loss_end})


def _to_plain(obj):
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    return obj if isinstance(obj, (str, int, float, bool)) or obj is None else str(obj)


def run_profiles(args, cache: Cache) -> None:
    import seqtool

    work = Path(args.work_dir)
    kv = load(args).model.config.num_key_value_heads
    variants = {
        "pruned-0.3-amp": lambda: seqtool.prune(load(args), 0.3, criterion="amp", output=work / "pruned-0.3",
                                                force=True, **calib_options(args)),
        f"gqa-{max(1, kv // 4)}-key": lambda: seqtool.convert(load(args), "gqa", kv_heads=max(1, kv // 4),
                                                              grouping="key", output=work / "gqa", force=True,
                                                              **calib_options(args)),
    }
    original = work / "original"
    if not (original / "config.json").exists():
        loaded = load(args)
        seqtool.save(loaded.model, loaded.tokenizer, original, step={"op": "copy"}, force=True)
    for name, make in variants.items():
        key = f"profile/{name}"
        if key in cache:
            continue
        log(f"{key} ...")
        out = Path(make().output)
        report = seqtool.profile(str(original), seq_len=args.profile_seq_len, compare=str(out), device="cpu")
        cache.put(key, _to_plain(report))


# ------------------------------------------------------------------------------------------------ render


def _fmt(x, digits=2, pct=False):
    if x is None:
        return "-"
    return f"{100 * x:.0f} %" if pct else f"{x:.{digits}f}"


def _mean_rows(rows: list[dict]) -> dict:
    keys = ("ppl", "passkey", "multikey", "removed_ratio")
    return {k: statistics.mean(r[k] for r in rows) if all(r.get(k) is not None for r in rows) else None
            for k in keys} | {"n": len(rows)}


def render(cache: Cache, args) -> str:
    rows = cache.data["rows"]
    s = cache.data["settings"]
    lines = [MARK_BEGIN, "",
             f"Model `{s['model']}`; eval at {s['seq_len']} tokens: perplexity over {s['ppl_tokens']} held-out tokens, "
             f"passkey / multikey exact match over {s['samples']} prompts × depths {s['depths']}; calibration "
             f"{s['calib_samples']} × {s['calib_seq_len']} tokens of built-in text; LoRA recovery {s['recover_steps']} "
             f"steps × 4 × 256 tokens (r=8). Regenerate with `python benchmarks/convert_quality.py`.", ""]
    base = rows.get("original")
    lines += ["### GQA", "", "| KV heads | grouping | KV bytes/token | ppl | passkey | multikey |",
              "|---|---|---|---|---|---|"]
    if base:
        lines.append(f"| {base['kv_heads']} (original) | - | {base['kv_bytes_per_token']} | {_fmt(base['ppl'])} | "
                     f"{_fmt(base['passkey'], pct=True)} | {_fmt(base['multikey'], pct=True)} |")
    gqa = sorted((k for k in rows if k.startswith("gqa/")), key=lambda k: (-int(k.split("/")[2]), k))
    for k in gqa:
        r = rows[k]
        lines.append(f"| {r['kv_heads']} | {k.split('/')[1]} | {r['kv_bytes_per_token']} | {_fmt(r['ppl'])} | "
                     f"{_fmt(r['passkey'], pct=True)} | {_fmt(r['multikey'], pct=True)} |")
    lines += ["", "### Pruning (fraction of attention + MLP parameters removed)", "",
              "| ratio | criterion | removed | ppl | passkey | multikey | ppl after LoRA | passkey after | multikey after |",
              "|---|---|---|---|---|---|---|---|---|"]
    for ratio in RATIOS:
        for crit in CRITERIA:
            seeds = RANDOM_SEEDS if crit == "random" else (0,)
            before = [rows[f"prune/{crit}/{ratio}/seed{s}/none"] for s in seeds if f"prune/{crit}/{ratio}/seed{s}/none" in rows]
            after = [rows[f"prune/{crit}/{ratio}/seed{s}/lora"] for s in seeds if f"prune/{crit}/{ratio}/seed{s}/lora" in rows]
            if not before:
                continue
            b = _mean_rows(before)
            a = _mean_rows(after) if after else {}
            label = crit + (f" (mean of {b['n']} seeds)" if crit == "random" else "")
            lines.append(f"| {ratio} | {label} | {_fmt(b['removed_ratio'], 3)} | {_fmt(b['ppl'])} | "
                         f"{_fmt(b['passkey'], pct=True)} | {_fmt(b['multikey'], pct=True)} | {_fmt(a.get('ppl'))} | "
                         f"{_fmt(a.get('passkey'), pct=True)} | {_fmt(a.get('multikey'), pct=True)} |")
    profiles = {k: v for k, v in rows.items() if k.startswith("profile/")}
    if profiles:
        lines += ["", f"### Speed and memory vs the original (CPU, `seqtool profile --compare`, {s['profile_seq_len']} "
                  "tokens; ratios = variant / original)", "",
                  "| variant | prefill | time to first token | decode / token | peak memory | KV cache |",
                  "|---|---|---|---|---|---|"]
        for k, rep in profiles.items():
            for c in rep.get("comparison") or []:
                lines.append(f"| {k.split('/', 1)[1]} | {_fmt(c['prefill_ratio'])} | {_fmt(c['ttft_ratio'])} | "
                             f"{_fmt(c['decode_ratio'])} | {_fmt(c['peak_memory_ratio'])} | {_fmt(c['kv_cache_ratio'])} |")
        env = next(iter(profiles.values())).get("environment")
        if env:
            lines += ["", f"Environment: `{json.dumps(env, sort_keys=True)}`"]
    lines += ["", MARK_END]
    return "\n".join(lines)


def write_doc(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    if MARK_BEGIN in text and MARK_END in text:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + section + rest.split(MARK_END, 1)[1]
    else:
        text = text + ("\n" if text else "") + section + "\n"
    path.write_text(text)


def main() -> None:
    args = parse_args()
    from seqtool.cli.common import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = {k: getattr(args, k) for k in ("model", "seq_len", "samples", "depths", "ppl_tokens", "calib_samples",
                                              "calib_seq_len", "recover_steps", "profile_seq_len")}
    if not args.render_only:
        from seqtool.arch.io import weights_fingerprint

        settings["weights"] = weights_fingerprint(load(args).model)
    cache = Cache(Path(args.cache), settings, check=not args.render_only)
    if not args.render_only:
        from seqtool.arch.registry import kv_cache_bytes_per_token

        if "original" not in cache:
            log("original ...")
            loaded = load(args)
            cfg = loaded.model.config
            cache.put("original", {**evaluate_row(loaded.model, loaded.tokenizer, args),
                                   "kv_heads": cfg.num_key_value_heads,
                                   "kv_bytes_per_token": kv_cache_bytes_per_token(cfg, 4)})
        parts = args.only or ["gqa", "prune", "profile"]
        if "gqa" in parts:
            run_gqa(args, cache)
        if "prune" in parts:
            run_prune(args, cache)
        if "profile" in parts:
            run_profiles(args, cache)
    write_doc(Path(args.doc), render(cache, args))
    log(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
