"""Training throughput: the engine (`seqtool finetune --method lora`) against a plain transformers + peft loop.

Same model, rows, batch, length, LoRA config (r 8 on every attention + MLP projection), AdamW and clipping.
The two loops run interleaved in one process (engine, plain, engine, plain, ...); each round times ``--steps``
optimizer steps after ``--warmup`` untimed ones, and the table reports the median tokens/s over rounds.

    python benchmarks/train.py                                   # ref, 256 x 8, CPU; writes benchmarks/results/train-cpu.json
    python benchmarks/train.py --model tiny-llama --rounds 2     # smoke run
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ref")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/train-<device>.json)")
    return p.parse_args()


def engine_round(args, data, device) -> float:
    """tokens/s of the engine: the same Trainer `seqtool finetune` runs."""
    from seqtool.arch.io import load_model
    from seqtool.train.loop import TrainConfig, Trainer
    from seqtool.train.objectives import LMLoss
    from seqtool.train.trainable import prepare

    model = prepare(load_model(args.model, device=str(device), dtype="fp32").model, "lora", "attention,mlp")
    total = args.warmup + args.steps
    trainer = Trainer(model, data, [LMLoss()], TrainConfig(steps=total, batch=args.batch, lr=1e-3, progress="off"))
    trainer.run(max_steps=args.warmup)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    trainer.run(max_steps=args.steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch * args.seq_len / (time.perf_counter() - t0)


def plain_round(args, data, device) -> float:
    """tokens/s of a textbook transformers + peft loop over the same rows."""
    import warnings

    from peft import LoraConfig, get_peft_model

    from seqtool.arch.io import load_model
    from seqtool.train.kinds import lora_targets

    base = load_model(args.model, device=str(device), dtype="fp32").model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=lora_targets(base),
                                                bias="none", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-3)
    model.train()

    def step(i: int) -> None:
        rows = data.step_rows(i, 0, args.batch, 1, 0)
        ids = data.train[rows].to(device)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        float(loss)  # both loops read the loss every step

    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch * args.seq_len / (time.perf_counter() - t0)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from seqtool.arch.io import load_model, resolve_device
    from seqtool.train.data import DataConfig, build_data

    device = resolve_device(args.device)
    tok = load_model(args.model, device="cpu").tokenizer
    need = (args.warmup + args.steps) * args.batch * args.seq_len
    data = build_data(tok, DataConfig(seq_len=args.seq_len, max_train_tokens=need))
    engine, plain = [], []
    for r in range(args.rounds):
        engine.append(engine_round(args, data, device))
        plain.append(plain_round(args, data, device))
        print(f"round {r}: engine {engine[-1]:,.0f} tok/s, plain {plain[-1]:,.0f} tok/s", file=sys.stderr, flush=True)
    result = {
        "model": args.model, "seq_len": args.seq_len, "batch": args.batch, "steps_per_round": args.steps,
        "warmup_steps": args.warmup, "rounds": args.rounds, "threads": args.threads, "device": device.type,
        "engine_tokens_per_s": [round(x, 1) for x in engine], "plain_tokens_per_s": [round(x, 1) for x in plain],
        "engine_median": round(statistics.median(engine), 1), "plain_median": round(statistics.median(plain), 1),
        "ratio": round(statistics.median(engine) / statistics.median(plain), 3),
        "ratio_of_round_medians": round(statistics.median(e / p for e, p in zip(engine, plain)), 3),
        "torch": torch.__version__, "python": platform.python_version(),
    }
    out = Path(args.out or ROOT / f"benchmarks/results/train-{device.type}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
