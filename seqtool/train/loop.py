"""THE training loop: AdamW, warmup + cosine, grad accumulation, clipping, bf16 autocast (GPU), gradient
checkpointing, resumable checkpoints, JSON-lines log, progress; one process or many (FSDP2 / DDP).

    trainer = Trainer(model, data, [LMLoss()], TrainConfig(steps=100), run_dir="run")
    outcome = trainer.run()

``run_dir`` holds ``run.json`` (what defines the run: resuming with anything else is an error),
``checkpoint.pt`` (trainable weights, optimizer, step, RNG, log so far; replaced atomically), ``log.jsonl`` and
``loss.png`` (``plot=True``). The rows of each step come from ``data.micro_batches`` (seed, step) and the learning
rate from the step, so ``resume=True`` continues bit-identically.
"""
from __future__ import annotations

import errno
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from seqtool.errors import BadInputError, SeqtoolError
from seqtool.train import dist as dist_mod
from seqtool.train.data import IGNORE, PackedData
from seqtool.train.objectives import _AUX_SINK, Objective, StepContext, teacher_needed
from seqtool.train.progress import TrainProgress

CHECKPOINT = "checkpoint.pt"
RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
# Settings that may change between a run and its resume (they do not change what is computed).
RESUME_FREE = ("save_every", "progress", "status_every_s", "plot")


class CheckpointWriteError(SeqtoolError):
    """A checkpoint could not be written (disk full, ...); the previous one is intact. Exit code 1."""


@dataclass
class TrainConfig:
    """Loop settings. ``batch`` is rows per micro-batch over all processes together (each of N processes takes
    batch/N), so the same command computes the same steps on any number of processes; an optimizer step sees
    ``batch * grad_accum`` rows."""

    steps: int
    batch: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int | None = None  # None: min(100, steps // 10)
    min_lr_frac: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    clip: float = 1.0
    seed: int = 0
    eval_every: int = 0
    eval_rows: int = 32
    save_every: str | None = None  # "200" steps, "10m" minutes, "90s" seconds; None: only at the end
    bf16: str = "auto"  # auto: autocast to bf16 on CUDA; on | off
    grad_checkpoint: bool = False
    progress: str = "auto"  # auto | bar | lines | off
    status_every_s: float = 30.0
    plot: bool = False

    def check(self) -> None:
        if self.steps < 1:
            raise BadInputError(f"--steps must be at least 1, got {self.steps}")
        for name in ("batch", "grad_accum"):
            if getattr(self, name) < 1:
                raise BadInputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise BadInputError(f"--lr must be > 0, got {self.lr}")
        if self.bf16 not in ("auto", "on", "off"):
            raise BadInputError(f"bf16 must be auto, on or off, got {self.bf16}")
        parse_save_every(self.save_every)

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup is not None else min(100, self.steps // 10)

    def lr_at(self, step: int) -> float:
        """Linear warmup to ``lr``, then cosine down to ``min_lr_frac * lr`` at the last step."""
        w = self.warmup_steps
        if step < w:
            return self.lr * (step + 1) / w
        frac = (step - w) / max(1, self.steps - w)
        return self.lr * (self.min_lr_frac + (1 - self.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def parse_save_every(value: str | None) -> tuple[str, float] | None:
    """``"200"`` → ("steps", 200); ``"10m"`` → ("seconds", 600); ``"90s"`` → ("seconds", 90)."""
    if value in (None, "", "0"):
        return None
    v = str(value).strip()
    try:
        if v.endswith("m"):
            return ("seconds", float(v[:-1]) * 60)
        if v.endswith("s"):
            return ("seconds", float(v[:-1]))
        n = int(v)
        if n < 1:
            raise ValueError
        return ("steps", n)
    except ValueError:
        raise BadInputError(f"--save-every takes steps (200) or minutes (10m), got '{value}'") from None


@dataclass
class TrainOutcome:
    """What a run did. ``history``: one record per step (``loss``, ``loss_<objective>``, ``lr``, ``tokens_per_s``,
    ``heldout_loss`` on eval steps); ``first``/``final``: mean losses over the first / last 10 % of steps."""

    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    first: dict
    final: dict
    heldout_loss: float | None
    resumed_from: int | None
    history: list = field(default_factory=list, repr=False)


def _mean_losses(records: list[dict]) -> dict:
    keys = sorted({k for r in records for k in r if k == "loss" or k.startswith("loss_")})
    return {k: round(float(np.mean([r[k] for r in records if k in r])), 5) for k in keys}


class Trainer:
    """One training run; see the module docstring. ``model`` is what trains (a peft model for LoRA: only
    parameters with ``requires_grad`` are optimised and checkpointed); ``teacher`` is frozen; ``identity`` is
    extra JSON that defines the run (model source, method, kinds ...) and must match on resume."""

    def __init__(self, model: nn.Module, data: PackedData, objectives: list[Objective], config: TrainConfig, *,
                 teacher: nn.Module | None = None, run_dir: str | Path | None = None, resume: bool = False,
                 identity: dict | None = None, dist: dist_mod.DistInfo | None = None,
                 layers: nn.ModuleList | None = None, callbacks: list | None = None,
                 allow_changes_on_resume: bool = False, teacher_context: int | None = None):
        config.check()
        if not objectives:
            raise BadInputError("no training objective given")
        if teacher_needed(objectives) and teacher is None:
            raise BadInputError("a kl/match objective needs a teacher model")
        self.config, self.data, self.objectives = config, data, objectives
        self.dist = dist or dist_mod.DistInfo()
        if config.batch % self.dist.world:
            raise BadInputError(f"--batch {config.batch} must be divisible by the number of processes ({self.dist.world})")
        self.teacher = teacher
        # The teacher sees only the first ``teacher_context`` tokens of a row (a model that is only valid up to
        # its trained context, e.g. the original model of a context extension); its logits are then shorter.
        self.teacher_context = teacher_context
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.resume = resume
        self.callbacks = list(callbacks or [])  # fn(trainer, record) after every step (may add to the record)
        self.allow_changes_on_resume = allow_changes_on_resume
        self.identity = {"config": {k: v for k, v in _jsonable(asdict(config)).items() if k not in RESUME_FREE},
                         "data_rows": data.fingerprint, "objectives": [o.describe() for o in objectives],
                         **({"teacher_context": teacher_context} if teacher_context else {}), **(identity or {})}
        self.device = next(model.parameters()).device
        if config.grad_checkpoint:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.config.use_cache = False
        self.inner = model  # the module whose named parameters are checkpointed (unwrapped)
        for o in objectives:
            o.attach(model, teacher)
        self.model = dist_mod.wrap(model, self.dist, layers)
        params = [(n, p) for n, p in self.inner.named_parameters() if p.requires_grad]
        if not params:
            raise BadInputError("nothing to train: the chosen kinds select no parameters")
        self.param_names = [n for n, _ in params]
        decay = [p for n, p in params if p.dim() >= 2 and config.weight_decay > 0]
        other = [p for n, p in params if not (p.dim() >= 2 and config.weight_decay > 0)]
        groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay},
                              {"params": other, "weight_decay": 0.0}) if g["params"]]
        self.optim = torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas))
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # after wrapping (FSDP: DTensors)
        self.autocast = self.device.type == "cuda" and config.bf16 != "off" or config.bf16 == "on"
        self.history: list[dict] = []
        self.step = 0
        self.tokens = 0
        self.resumed_from: int | None = None

    # ------------------------------------------------------------ run directory

    def _prepare_run_dir(self) -> None:
        if self.run_dir is None:
            if self.resume:
                raise BadInputError("--resume needs --run-dir")
            return
        run_file, ckpt = self.run_dir / RUN_FILE, self.run_dir / CHECKPOINT
        if self.resume:
            if not ckpt.exists() or not run_file.exists():
                raise BadInputError(f"--resume: no checkpoint in '{self.run_dir}'; start without --resume")
            saved = json.loads(run_file.read_text())
            mine = _jsonable(self.identity)
            diff = _first_difference(saved, mine)
            if diff is not None and self.allow_changes_on_resume:
                print(f"note: resuming with changed settings ({diff})", file=sys.stderr, flush=True)
            elif diff is not None:
                raise BadInputError(f"--resume with different arguments ({diff}); rerun with the original arguments "
                                    "or use a new --run-dir")
            self._load_checkpoint(ckpt)
        elif ckpt.exists():
            raise BadInputError(f"'{self.run_dir}' already holds a run; pass --resume to continue it or choose "
                                "another --run-dir")
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(run_file, json.dumps(_jsonable(self.identity), indent=1))
            # The log holds exactly the steps the checkpoint has (a killed run may have logged further).
            _atomic_write_text(self.run_dir / LOG_FILE, "".join(json.dumps(r) + "\n" for r in self.history))

    def _checkpoint_state(self) -> dict | None:
        if self.dist.enabled and self.dist.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            msd, osd = get_state_dict(self.model, self.optim,
                                      options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            trainable = set(self.param_names)
            msd = {k: v for k, v in msd.items() if k in trainable}
        else:
            named = dict(self.inner.named_parameters())
            msd = {n: named[n].detach().cpu().clone() for n in self.param_names}
            osd = self.optim.state_dict()
        if not self.dist.is_main:
            return None
        return {"step": self.step, "trainable": msd, "optim": osd, "history": self.history,
                "fsdp": self.dist.enabled and self.dist.mode == "fsdp",
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}

    def save_checkpoint(self) -> None:
        """Write ``checkpoint.pt`` atomically (temp file + rename); on failure the previous one stays."""
        if self.run_dir is None:
            return
        state = self._checkpoint_state()
        if state is None:
            return
        path = self.run_dir / CHECKPOINT
        tmp = path.with_name(f".{CHECKPOINT}.tmp")
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            why = "out of disk space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
            prev = "the previous checkpoint is intact" if path.exists() else "no earlier checkpoint exists"
            raise CheckpointWriteError(f"{why} while writing checkpoint '{path}' at step {self.step}; {prev}") from None

    def _load_checkpoint(self, path: Path) -> None:
        state = torch.load(path, weights_only=False, map_location="cpu")
        if state["fsdp"] != (self.dist.enabled and self.dist.mode == "fsdp"):
            raise BadInputError("--resume: the checkpoint was written with a different --dist setting")
        if state["fsdp"]:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(self.model, self.optim, model_state_dict=state["trainable"], optim_state_dict=state["optim"],
                           options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            named = dict(self.inner.named_parameters())
            missing = [n for n in self.param_names if n not in state["trainable"]]
            if missing:
                raise BadInputError(f"--resume: checkpoint lacks trainable weight '{missing[0]}'")
            with torch.no_grad():
                for n in self.param_names:
                    named[n].copy_(state["trainable"][n])
            self.optim.load_state_dict(state["optim"])
        self.step, self.history = int(state["step"]), list(state["history"])
        self.tokens = int(self.history[-1].get("tokens", 0)) if self.history else 0
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.resumed_from = self.step

    # ------------------------------------------------------------ one step

    def _forward(self, model: nn.Module, ids: torch.Tensor):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return model(input_ids=ids, use_cache=False)

    def train_step(self) -> dict:
        """One optimizer step (``grad_accum`` micro-batches); returns its log record."""
        cfg, data, world, rank = self.config, self.data, self.dist.world, self.dist.rank
        lr = cfg.lr_at(self.step)
        for g in self.optim.param_groups:
            g["lr"] = lr
        micro = data.micro_batches(self.step, cfg.grad_accum, cfg.batch, cfg.seed)
        targets = sum(int((mb["labels"][:, 1:] != IGNORE).sum()) for mb in micro)
        token_scale = world / max(targets, 1)
        micro_scale = 1.0 / len(micro)
        parts: dict[str, float] = {}
        tokens = 0
        started = time.perf_counter()
        self.model.train()
        for m, mb in enumerate(micro):
            rows = mb["input_ids"].shape[0]
            if rows % world:
                raise BadInputError(f"a micro-batch of {rows} rows does not split over {world} processes")
            per = rows // world
            tokens += mb["input_ids"].numel()
            # This process's rows; tensors without a leading batch dimension (extras) go to every process.
            local = {k: (v[rank * per:(rank + 1) * per] if torch.is_tensor(v) and v.dim() and v.shape[0] == rows
                         else v) for k, v in mb.items()}
            local = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in local.items()}
            ids, labels = local["input_ids"], local["labels"]
            sink: list = []
            token = _AUX_SINK.set(sink)
            try:
                out = self._forward(self.model, ids)
            finally:
                _AUX_SINK.reset(token)
            teacher_logits = None
            if self.teacher is not None:
                with torch.no_grad():
                    t_ids = ids if not self.teacher_context else ids[:, :self.teacher_context]
                    teacher_logits = self._forward(self.teacher, t_ids).logits
            ctx = StepContext(input_ids=ids, labels=labels, logits=out.logits, target_mask=labels[:, 1:] != IGNORE,
                              token_scale=token_scale, micro_scale=micro_scale, teacher_logits=teacher_logits,
                              aux_terms=sink, outputs=out, batch=local)
            loss = out.logits.new_zeros((), dtype=torch.float32)
            for obj in self.objectives:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    value = obj(ctx)  # under the forward's autocast, as in a loop that computes loss in place
                loss = loss + obj.weight * value
                parts[f"loss_{obj.name}"] = parts.get(f"loss_{obj.name}", 0.0) + float(value.detach())
                for k, v in (getattr(obj, "metrics", None) or {}).items():  # extra numbers an objective reports
                    parts[k] = parts.get(k, 0.0) + float(v) * micro_scale
            parts["loss"] = parts.get("loss", 0.0) + float(loss.detach())
            sync = m == len(micro) - 1
            if self.dist.enabled and self.dist.mode == "ddp" and not sync:
                with self.model.no_sync():
                    loss.backward()
            else:
                loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.clip) if cfg.clip > 0 else None
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        # Each process's sums carry the factor ``world`` (token_scale): their mean over processes is the global mean.
        parts = dist_mod.all_reduce_mean(parts, self.dist)
        self.step += 1
        self.tokens += tokens
        record = {"step": self.step, **{k: round(v, 6) for k, v in parts.items()}, "lr": lr, "tokens": self.tokens,
                  "tokens_per_s": round(tokens / max(seconds, 1e-9), 1), "seconds": round(seconds, 4)}
        if grad_norm is not None:
            gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            record["grad_norm"] = round(float(gn), 5)
        return record

    @torch.no_grad()
    def heldout_loss(self) -> float:
        """Mean next-token loss over the first ``eval_rows`` held-out rows (every process runs all of them)."""
        heldout = getattr(self.data, "heldout", None)
        if heldout is None or len(heldout) == 0:
            return float("nan")
        rows = heldout[:self.config.eval_rows]
        self.model.eval()
        total, count = 0.0, 0
        for i in range(0, rows.shape[0], self.config.batch):
            ids = rows[i:i + self.config.batch].to(self.device)
            logits = self._forward(self.model, ids).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                    reduction="sum")
            total, count = total + float(nll), count + ids[:, 1:].numel()
        self.model.train()
        return total / max(count, 1)

    # ------------------------------------------------------------ the loop

    def run(self, max_steps: int | None = None) -> TrainOutcome:
        """Train until ``config.steps`` (or ``max_steps`` more steps in this call); returns the outcome."""
        cfg = self.config
        self._prepare_run_dir()
        save_rule = parse_save_every(cfg.save_every)
        show = self.dist.is_main and cfg.progress != "off"
        progress = TrainProgress(cfg.steps, self.step, cfg.progress if show else "off", cfg.status_every_s)
        started = time.perf_counter()
        last_save = started
        start_step = self.step
        log = open(self.run_dir / LOG_FILE, "a") if self.run_dir is not None and self.dist.is_main else None
        try:
            while self.step < cfg.steps and (max_steps is None or self.step - start_step < max_steps):
                record = self.train_step()
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    held = self.heldout_loss()
                    if math.isfinite(held):
                        record["heldout_loss"] = round(held, 6)
                for callback in self.callbacks:
                    callback(self, record)
                self.history.append(record)
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                progress.update(self.step, record["loss"], record["tokens_per_s"])
                due = save_rule is not None and (
                    (save_rule[0] == "steps" and self.step % save_rule[1] == 0)
                    or (save_rule[0] == "seconds" and time.perf_counter() - last_save >= save_rule[1]))
                if due and self.step < cfg.steps:
                    self.save_checkpoint()
                    last_save = time.perf_counter()
            self.save_checkpoint()
        finally:
            progress.close()
            if log is not None:
                log.close()
            for o in self.objectives:
                o.detach()
        if cfg.plot and self.run_dir is not None and self.dist.is_main:
            plot_history(self.history, self.run_dir / "loss.png")
        return self.outcome(time.perf_counter() - started)

    def outcome(self, seconds: float) -> TrainOutcome:
        done = list(self.history)
        tenth = max(1, len(done) // 10)
        evals = [r["heldout_loss"] for r in done if "heldout_loss" in r]
        tokens = done[-1].get("tokens", 0) if done else 0
        speeds = [r["tokens_per_s"] for r in done[-tenth * 5:]]
        return TrainOutcome(steps=self.step, tokens=tokens, seconds=round(seconds, 3),
                            tokens_per_s=round(float(np.median(speeds)), 1) if speeds else 0.0,
                            first=_mean_losses(done[:tenth]), final=_mean_losses(done[-tenth:]),
                            heldout_loss=evals[-1] if evals else None, resumed_from=self.resumed_from,
                            history=done)


def plot_history(history: list[dict], path: Path) -> Path | None:
    """Loss per objective (and held-out loss) against step, written to ``path``; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = sorted({k for r in history for k in r if k.startswith("loss_")}) or ["loss"]
    for k in keys:
        pts = [(r["step"], r[k]) for r in history if k in r]
        ax.plot(*zip(*pts), label=k, linewidth=1)
    ev = [(r["step"], r["heldout_loss"]) for r in history if "heldout_loss" in r]
    if ev:
        ax.plot(*zip(*ev), "o-", label="held-out", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
            if d:
                return d
        return None
    return None if a == b else f"{path}: was {a!r}, now {b!r}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"cannot write '{path}': {exc.strerror or exc}") from None
