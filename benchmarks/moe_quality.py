"""Branch-Train-Mix on `ref`: dense average vs MoE (FFN experts) vs BAM (full / K/V-shared attention experts).

1. Two domains shipped with every Python install: `code` (the standard library's sources, seqtool's corpus split)
   and `docs` (the English reference documentation in `pydoc_data.topics`; one topic in eight held out).
2. Branch: `ref` fine-tuned on each domain (`seqtool.finetune`, full, equal steps).
3. Mix the two branches four ways: (a) dense average of the branches, (b) `convert --to moe --router hidden`,
   (c) `convert --to bam --router hidden`, (d) the same with `--attention-experts kv-shared`; then train each
   for the same mixing steps on both domains (full fine-tune of attention + MLP, which includes routers and
   experts; MoE/BAM add the load-balancing loss `balance=0.01`).
4. Measure: held-out perplexity per domain and on their mixture, passkey at 2k, total / active parameters, decode
   tokens/s (1 thread, 1k prompt), KV-cache bytes per 1k tokens. Rows before mixing (0 mixing steps) too.

Resumable: every stage writes into --workdir and is skipped when its output exists. Run niced:
    nice -n 10 python benchmarks/moe_quality.py --workdir /tmp/seqtool-moe-quality
Results: benchmarks/results/moe_quality.json and .md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def write_domains(work: Path) -> dict[str, Path]:
    """Train / held-out text files of both domains, and the held-out mixture."""
    from pydoc_data.topics import topics

    from seqtool.zoo import corpus

    files = {name: work / f"{name}.txt" for name in
             ("code_train", "code_heldout", "docs_train", "docs_heldout", "mix_train", "mix_heldout")}
    if all(p.exists() for p in files.values()):
        return files
    held = {k for k in topics if int(hashlib.sha1(k.encode()).hexdigest()[:8], 16) % 8 == 0}
    docs_train = "\n\n".join(topics[k] for k in sorted(topics) if k not in held)
    docs_heldout = "\n\n".join(topics[k] for k in sorted(held))
    code_train = corpus.load_text("train", max_chars=len(docs_train))
    code_heldout = corpus.load_text("heldout", max_chars=len(docs_heldout))
    files["code_train"].write_text(code_train)
    files["code_heldout"].write_text(code_heldout)
    files["docs_train"].write_text(docs_train)
    files["docs_heldout"].write_text(docs_heldout)
    files["mix_train"].write_text(code_train + "\n\n" + docs_train)
    half = min(len(code_heldout), len(docs_heldout)) // 2
    files["mix_heldout"].write_text(code_heldout[:half] + "\n\n" + docs_heldout[:half])
    return files


def finetune(source, data: Path, out: Path, steps: int, args, loss: str = "lm") -> None:
    import seqtool

    if (out / "config.json").exists():
        return
    seqtool.finetune(str(source), data=str(data), steps=steps, method="full", train="attention,mlp", loss=loss,
                     seq_len=args.seq_len, batch=args.batch, lr=args.lr, output=out, progress="off", seed=0,
                     run_dir=out.parent / f"{out.name}-run", resume=(out.parent / f"{out.name}-run").exists())


def dense_average(branches: list[Path], out: Path) -> None:
    import torch

    from seqtool.arch.io import load_model, save_model

    if (out / "config.json").exists():
        return
    stored = load_model(str(branches[0]), dtype="auto", device="cpu", meta=True).model.dtype  # the branches' dtype
    loaded = [load_model(str(b), dtype="fp32", device="cpu") for b in branches]
    first = loaded[0].model
    with torch.no_grad():
        for name, p in first.named_parameters():
            p.copy_(torch.stack([dict(m.model.named_parameters())[name] for m in loaded]).mean(0))
    save_model(first.to(stored), loaded[0].tokenizer, out, step={"op": "average", "seeds": [str(b) for b in branches]})


def convert(branches: list[Path], out: Path, to: str, router_data: list[Path], **options) -> None:
    from seqtool.convert import convert as run

    if (out / "config.json").exists():
        return
    run(str(branches[0]), to, from_=[str(b) for b in branches[1:]], router="hidden",
        router_data=[str(p) for p in router_data], samples=16, seq_len=256, output=out, **options)


def measure(path: Path, files: dict[str, Path], args) -> dict:
    import seqtool
    from seqtool.arch.inspect import inspect_model

    info = inspect_model(str(path))
    row = {"params_total": info.params_total, "params_active": info.params_active,
           "kv_bytes_per_1k": info.kv_cache_bytes_per_1k_tokens}
    for domain in ("code", "docs", "mix"):
        result = seqtool.evaluate(str(path), tasks="ppl", data=str(files[f"{domain}_heldout"]), seq_lens=(1024,),
                                  ppl_tokens=args.ppl_tokens, dtype="fp32", device="cpu")
        row[f"ppl_{domain}"] = round(result.ppl[0].ppl, 3)
    if args.passkey_samples:
        result = seqtool.evaluate(str(path), tasks="passkey", seq_lens=(2048,), samples=args.passkey_samples,
                                  depths=(0.1, 0.5, 0.9), dtype="fp32", device="cpu")
        row["passkey_2k"] = round(result.mean_accuracy("passkey", 2048), 3)
    report = seqtool.profile(str(path), seq_len=1024, decode_tokens=16, repeats=1, threads=1, dtype="fp32",
                             device="cpu")
    row["decode_tok_s"] = round(report.models[0].rows[0].decode_tokens_per_s or float("nan"), 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/seqtool-moe-quality")
    parser.add_argument("--branch-steps", type=int, default=30)
    parser.add_argument("--mix-steps", type=int, default=15)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--passkey-samples", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--ppl-tokens", type=int, default=8192)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    files = write_domains(work)
    started = time.perf_counter()
    branches = [work / "branch-code", work / "branch-docs"]
    finetune("ref", files["code_train"], branches[0], args.branch_steps, args)
    finetune("ref", files["docs_train"], branches[1], args.branch_steps, args)
    router_data = [files["code_train"], files["docs_train"]]
    made = {
        "dense average": (work / "avg", lambda out: dense_average(branches, out), "lm"),
        "MoE (FFN experts)": (work / "moe", lambda out: convert(branches, out, "moe", router_data), "lm=1,balance=0.01"),
        "BAM full": (work / "bam-full", lambda out: convert(branches, out, "bam", router_data), "lm=1,balance=0.01"),
        "BAM kv-shared": (work / "bam-kv", lambda out: convert(branches, out, "bam", router_data,
                                                                attention_experts="kv-shared"), "lm=1,balance=0.01"),
    }
    cache_path = work / "rows.json"
    rows = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    for label, path in (("ref", "ref"), ("branch code", branches[0]), ("branch docs", branches[1])):
        if label not in rows:
            rows[label] = {"mix_steps": None, **measure(path, files, args)}
            cache_path.write_text(json.dumps(rows, indent=2))
    for label, (out, build, loss) in made.items():
        build(out)
        mixed = out.parent / f"{out.name}-mixed"
        finetune(out, files["mix_train"], mixed, args.mix_steps, args, loss=loss)
        for key, path, steps in ((f"{label}, before mixing", out, 0), (label, mixed, args.mix_steps)):
            if key not in rows:
                rows[key] = {"mix_steps": steps, **measure(path, files, args)}
                cache_path.write_text(json.dumps(rows, indent=2))
    settings = {k: v for k, v in vars(args).items() if k != "workdir"}
    payload = {"settings": settings, "rows": rows, "seconds_this_run": round(time.perf_counter() - started)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "moe_quality.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["| model | mixing steps | ppl code | ppl docs | ppl mix | passkey 2k | params total / active | "
             "decode tok/s | KV / 1k tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        steps = "" if r["mix_steps"] is None else r["mix_steps"]
        lines.append(f"| {label} | {steps} | {r['ppl_code']} | {r['ppl_docs']} | {r['ppl_mix']} | "
                     f"{r.get('passkey_2k', '')} | {r['params_total'] / 1e6:.2f}M / {r['params_active'] / 1e6:.2f}M | "
                     f"{r['decode_tok_s']} | {r['kv_bytes_per_1k'] // 1024} KiB |")
    (RESULTS / "moe_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
