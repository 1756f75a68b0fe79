"""``--recover lora|full|distill``: a short training run on the engine (:mod:`seqtool.train`) after a conversion.

- ``lora``: peft LoRA (r 8) on every attention and MLP projection, causal-LM loss on built-in text; merged.
- ``full``: every weight of the modules the conversion rewrote (gqa: attention; prune: attention + MLP),
  causal-LM loss.
- ``distill``: the same modules, KL to the model as it was before the conversion (the teacher) plus attention
  transfer (``match``: MSE between each layer's attention output and the teacher's), on built-in text
  mixed with 30 % synthetic retrieval rows (``loss`` may add ``answer``/``answer_kl`` terms on their answer
  tokens; measured worse on ``ref``, see docs/train.md); a length schedule: the first 3/4 of the steps at 512
  tokens × 8 rows, the last 1/4 (``long_frac``) at 2048 tokens × 2 rows (``long_seq_len``, ``long_batch``: the
  same tokens per step) so the model ends at the evaluation length; bf16 autocast (also on CPU, where it is
  ~1.5x faster for this loop).

Defaults per mode are in :data:`RECOVERY_DEFAULTS` (``steps`` and every other setting can be overridden).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch.nn as nn

from seqtool.convert.base import RecoveryResult
from seqtool.errors import BadInputError

RECOVERY_MODES = ("lora", "full", "distill")
RECOVERY_DEFAULTS: dict[str, dict] = {
    "lora": {"steps": 100, "seq_len": 256, "batch": 4, "lr": 1e-3, "loss": "lm", "mix_retrieval": 0.0},
    "full": {"steps": 100, "seq_len": 256, "batch": 4, "lr": 3e-4, "loss": "lm", "mix_retrieval": 0.0},
    "distill": {"steps": 400, "seq_len": 512, "batch": 8, "lr": 1e-3, "loss": "kl=1,match=1", "mix_retrieval": 0.3,
                "bf16": "on", "long_frac": 0.25, "long_seq_len": 2048, "long_batch": 2},
}
# With a run directory, a checkpoint every 5 minutes (a killed recovery resumes with --resume).
SAVE_EVERY = "5m"


def recover(model: nn.Module, tokenizer, mode: str, *, kinds: tuple[str, ...], teacher: nn.Module | None = None,
            steps: int | None = None, seed: int = 0, adapter_dir: str | Path | None = None,
            run_dir: str | Path | None = None, resume: bool = False, progress: str = "off",
            **overrides) -> RecoveryResult:
    """Train ``model`` in place with recovery ``mode`` and merge; ``kinds`` are the module kinds the conversion
    changed (``full``/``distill`` train them), ``teacher`` the pre-conversion model (``distill``)."""
    from seqtool.train.data import DataConfig, LengthSchedule, build_data
    from seqtool.train.finetune import run_training
    from seqtool.train.kinds import DEFAULT_KINDS
    from seqtool.train.loop import TrainConfig
    from seqtool.train.trainable import LoraOptions

    if mode not in RECOVERY_MODES:
        raise BadInputError(f"unknown recovery '{mode}'; use {', '.join(RECOVERY_MODES)} or leave it out")
    if mode == "distill" and teacher is None:
        raise BadInputError("--recover distill needs the original model as teacher")
    opts = {**RECOVERY_DEFAULTS[mode], **{k: v for k, v in overrides.items() if v is not None}}
    steps = steps if steps is not None else opts["steps"]
    unknown = sorted(set(opts) - {"steps", "seq_len", "batch", "lr", "loss", "mix_retrieval", "rank", "alpha",
                                  "grad_accum", "warmup", "data", "eval_every", "save_every", "bf16",
                                  "long_frac", "long_seq_len", "long_batch"})
    if unknown:
        raise BadInputError(f"unknown recovery option(s) {', '.join(unknown)}")
    started = time.perf_counter()
    train = list(DEFAULT_KINDS) if mode == "lora" else list(kinds)
    if not 0.0 <= opts.get("long_frac", 0.0) < 1.0:
        raise BadInputError(f"long_frac must be in [0, 1), got {opts['long_frac']}")
    long_steps = round(steps * opts.get("long_frac", 0.0))
    phases = [(steps - long_steps, opts["seq_len"], opts["batch"])]
    if long_steps > 0:
        phases.append((long_steps, opts.get("long_seq_len", opts["seq_len"]), opts.get("long_batch", opts["batch"])))
    cache = Path(run_dir) / "data" if run_dir is not None else None
    parts = []
    for n, seq_len, batch in phases:
        cfg = DataConfig(source=opts.get("data"), seq_len=seq_len, seed=seed + 1, mix_retrieval=opts["mix_retrieval"],
                         max_train_tokens=max(n * batch * opts.get("grad_accum", 1) * seq_len, 64 * seq_len))
        parts.append(build_data(tokenizer, cfg, cache))
    data = parts[0] if len(parts) == 1 else LengthSchedule(parts, [b for _, _, b in phases],
                                                          [sum(p[0] for p in phases[:i + 1]) for i in range(len(phases))])
    config = TrainConfig(steps=steps, batch=opts["batch"], grad_accum=opts.get("grad_accum", 1), lr=opts["lr"],
                         warmup=opts.get("warmup"), seed=seed, eval_every=opts.get("eval_every", 0),
                         save_every=opts.get("save_every", SAVE_EVERY), bf16=opts.get("bf16", "auto"), progress=progress)
    was_training = model.training
    run = run_training(model, tokenizer, data=data, config=config, method="lora" if mode == "lora" else "full",
                       train=train, loss=opts["loss"], teacher=teacher,
                       lora=LoraOptions(rank=opts.get("rank", 8), alpha=opts.get("alpha", 16)), run_dir=run_dir,
                       resume=resume, identity={"recover": mode}, adapter_dir=adapter_dir)
    if run.model is not model:
        raise RuntimeError("recovery returned a different model object after merging")
    model.train(was_training)
    out = run.outcome
    return RecoveryResult(
        method=mode, steps=out.steps, rank=opts.get("rank", 8) if mode == "lora" else None,
        alpha=opts.get("alpha", 16) if mode == "lora" else None, lr=opts["lr"], batch_size=opts["batch"],
        seq_len=opts["seq_len"], target_modules=train, loss_start=out.first.get("loss", float("nan")),
        loss_end=out.final.get("loss", float("nan")), seconds=round(time.perf_counter() - started, 3),
        adapter_dir=str(adapter_dir) if run.adapter_dir else None, objectives=run.objectives,
        data_fingerprint=data.fingerprint, heldout_ppl_before=round(math.exp(run.heldout_loss_before), 4),
        heldout_ppl_after=round(math.exp(run.heldout_loss), 4))
