"""``finetune``: load → make kinds trainable (LoRA / full) → train on packed data with weighted objectives →
merge → save a plain-transformers checkpoint with a ``finetune`` recipe step. Also :func:`run_training`, the
in-memory core that conversions (``convert --recover``) call on a model they already hold.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from seqtool.arch.registry import decoder_layers
from seqtool.errors import BadInputError
from seqtool.train import dist as dist_mod
from seqtool.train.data import DataConfig, LengthSchedule, PackedData, build_data, tokenizer_fingerprint
from seqtool.train.kinds import DEFAULT_KINDS, kind_modules, parse_kinds
from seqtool.train.loop import Trainer, TrainConfig, TrainOutcome
from seqtool.train.objectives import AnswerLoss, KLDistill, LMLoss, ModuleMatch, Objective, parse_loss_weights
from seqtool.train.routers import ROUTER_LOSSES, RouterLoss  # also registers the router / experts kinds
from seqtool.train.trainable import DEFAULT_LR, LoraOptions, count_parameters, merge, prepare, save_adapter


@dataclass
class FinetuneResult:
    """What ``finetune`` did; ``heldout_ppl_before``/``heldout_ppl`` are on the data's held-out rows."""

    source: str
    output: str | None
    method: str
    train: list[str]
    objectives: list[dict]
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    trainable_params: int
    total_params: int
    data: dict
    loss_first: dict
    loss_final: dict
    heldout_ppl_before: float
    heldout_ppl: float
    teacher: str | None = None
    adapter_dir: str | None = None
    run_dir: str | None = None
    resumed_from: int | None = None
    long_context: dict | None = None  # --context runs: context, rope_scale, attention, group_size, sinks

    @property
    def model(self):
        """The merged model (not serialised)."""
        return getattr(self, "_model", None)

    @property
    def history(self) -> list[dict]:
        """Per-step log records (also in ``run_dir/log.jsonl``; not in the JSON output)."""
        return getattr(self, "_history", [])


def build_objectives(loss: str | dict[str, float], *, student: nn.Module, kl_temperature: float = 1.0,
                     kl_top_k: int | None = None, match: str = "attention") -> list[Objective]:
    """Objectives from ``"lm=1,kl=0.5,match=0.1"``; ``match`` names the module kinds whose outputs are matched."""
    weights = parse_loss_weights(loss) if isinstance(loss, str) else dict(loss)
    out: list[Objective] = []
    for name, w in weights.items():
        if name == "lm":
            out.append(LMLoss(w))
        elif name == "kl":
            out.append(KLDistill(w, temperature=kl_temperature, top_k=kl_top_k))
        elif name in ("answer", "answer_kl"):
            out.append(AnswerLoss(w, teacher=name == "answer_kl"))
        elif name == "match":
            modules = [m for names in kind_modules(student, match).values() for m in names]
            out.append(ModuleMatch(modules, w))
        elif name in ROUTER_LOSSES:
            out.append(RouterLoss(name, w))
        else:
            raise BadInputError(f"unknown objective '{name}'")
    return out


def check_teacher_tokenizer(student_tok, teacher_tok) -> None:
    if student_tok is None or teacher_tok is None:
        return
    if tokenizer_fingerprint(student_tok) != tokenizer_fingerprint(teacher_tok):
        raise BadInputError("the teacher's tokenizer differs from the student's; distillation needs the same "
                            "vocabulary (use a teacher of the same family)")


@dataclass
class TrainingRun:
    """The in-memory result of :func:`run_training`: the merged model and what happened."""

    model: nn.Module
    outcome: TrainOutcome
    data: PackedData
    objectives: list[dict]
    trainable_params: int
    total_params: int
    heldout_loss_before: float
    heldout_loss: float
    adapter_dir: str | None


def run_training(model: nn.Module, tokenizer, *, data: PackedData | Any, config: TrainConfig, method: str = "lora",
                 train: str | list[str] = DEFAULT_KINDS, loss: str | dict = "lm", teacher: nn.Module | None = None,
                 kl_temperature: float = 1.0, kl_top_k: int | None = None, match: str = "attention",
                 lora: LoraOptions | None = None, run_dir: str | Path | None = None, resume: bool = False,
                 identity: dict | None = None, adapter_dir: str | Path | None = None,
                 dist: dist_mod.DistInfo | None = None, max_steps: int | None = None,
                 teacher_context: int | None = None) -> TrainingRun:
    """Train ``model`` (in place) and return it merged. ``adapter_dir`` (lora) receives the peft adapter.

    Under several processes (``dist``) every rank calls this; rank 0 gets the merged full model, the others
    get ``model=None`` in the result. ``teacher_context``: the teacher sees only each row's first tokens."""
    info = dist or dist_mod.DistInfo()
    kinds = parse_kinds(train)
    objectives = build_objectives(loss, student=model, kl_temperature=kl_temperature, kl_top_k=kl_top_k, match=match)
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    net = prepare(model, method, kinds, lora, seed=config.seed)
    trainable, total = count_parameters(net)
    template = None
    if info.enabled and info.mode == "fsdp" and info.is_main:
        template = copy.deepcopy(net).to("cpu")  # rank 0's unsharded copy receives the gathered weights at the end
    layers = decoder_layers(model) if info.enabled and info.mode == "fsdp" else None
    trainer = Trainer(net, data, objectives, config, teacher=teacher, run_dir=run_dir, resume=resume,
                      identity={"method": method, "train": kinds, **(identity or {})}, dist=info, layers=layers,
                      teacher_context=teacher_context)
    before = trainer.heldout_loss()
    outcome = trainer.run(max_steps=max_steps)
    after = trainer.heldout_loss()
    full = dist_mod.full_state_dict(trainer.model, info) if info.enabled else None
    result_model, adapter_out = None, None
    if info.is_main:
        final = dist_mod.unwrap(trainer.model, info)
        if template is not None:
            template.load_state_dict(full)
            final = template
        if adapter_dir is not None:
            adapter_out = str(save_adapter(final, adapter_dir))
        result_model = merge(final)
    dist_mod.barrier(info)
    return TrainingRun(result_model, outcome, data, [o.describe() for o in objectives], trainable, total, before,
                       after, adapter_out)


def _needs_teacher(loss: str) -> bool:
    return any(name in ("kl", "match", "answer_kl") for name in parse_loss_weights(loss))


def _save_dtype(loaded) -> torch.dtype | None:
    if loaded.path is None:
        return None
    from seqtool.arch.io import checkpoint_dtype

    return checkpoint_dtype(json.loads((Path(loaded.path) / "config.json").read_text()))


def finetune(model: Any, *, steps: int | None = None, data: str | None = None, output: str | Path | None = None,
             method: str = "lora", train: str | None = None, loss: str | None = None, teacher: Any = None,
             kl_temperature: float = 1.0, kl_top_k: int | None = None, match: str = "attention",
             seq_len: int | None = None, batch: int | None = None, grad_accum: int = 1, lr: float | None = None,
             warmup: int | None = None, weight_decay: float = 0.0, clip: float = 1.0, seed: int = 0,
             mix_retrieval: float | None = None, heldout: float = 0.05, eval_every: int = 0, eval_rows: int | None = None,
             run_dir: str | Path | None = None, resume: bool = False, save_every: str | None = None,
             save_adapter: str | Path | None = None, lora_rank: int = 8, lora_alpha: int = 16,
             grad_checkpoint: bool = False, bf16: str = "auto", dist: str = "fsdp", progress: str = "auto",
             plot: bool = False, dtype: str = "fp32", device: str = "auto", force: bool = False,
             tokenizer: Any = None, max_steps: int | None = None, context: str | int | None = None,
             rope_scale: str | None = None, group_size: str | int | None = None,
             sinks: int | None = None, short_frac: float | None = None) -> FinetuneResult:
    """Fine-tune ``model`` (path / preset / LoadedModel / transformers model) and save it merged to ``output``.

    ``data``: see :mod:`seqtool.train.data` (None = built-in corpus); ``train``: module kinds; ``loss``:
    weighted objectives ``"lm=1,kl=1,match=0.1"`` (kl/match need ``teacher``, a path/preset/model with the same
    tokenizer); ``batch``: rows per micro-batch over all processes; under ``torchrun`` the processes train
    together (``dist``: fsdp | ddp) and rank 0 saves. Returns a :class:`FinetuneResult` (``.model``: merged).

    Long context (:mod:`seqtool.train.long_context`): ``context="8k"`` trains rows of that length and extends the
    model to it (``rope_scale="linear:4"|"dynamic:4"|"yarn:4"``; default: yarn at new context / trained context);
    ``method="sinklora"|"s2attn"`` trains LoRA (default kinds attention,embed,norm) with that grouped attention
    (``group_size``, default context/4; ``sinks``, default 4) while training only; the saved model uses full
    attention. Unset options take the long-context recipe's defaults (:data:`LONG_RECIPE`)."""
    from seqtool.arch.io import prepare_output, resolve_device, save_model

    from seqtool.train.long_context import LONG_METHODS, LONG_RECIPE

    started = time.perf_counter()
    if method not in DEFAULT_LR and method not in LONG_METHODS:
        raise BadInputError(f"unknown --method '{method}'; use lora, full, {' or '.join(LONG_METHODS)}")
    long_attention = method if method in LONG_METHODS else None
    if long_attention is not None and context is None:
        raise BadInputError(f"--method {method} needs --context (e.g. --context 8k)")
    for name, value in (("--rope-scale", rope_scale), ("--group-size", group_size), ("--sinks", sinks),
                        ("--short-frac", short_frac)):
        if value is not None and context is None:
            raise BadInputError(f"{name} needs --context")
    recipe = LONG_RECIPE if context is not None else {}
    if steps is None:
        if not recipe:
            raise BadInputError("--steps is required (long-context runs with --context have a default)")
        steps = recipe["steps"]
    if steps < 1:
        raise BadInputError(f"--steps must be at least 1, got {steps}")
    train = train if train is not None else recipe.get("train", "attention,mlp")
    batch = batch if batch is not None else recipe.get("batch", 8)
    mix_retrieval = mix_retrieval if mix_retrieval is not None else recipe.get("mix_retrieval", 0.0)
    lr = lr if lr is not None else recipe.get("lr")
    warmup = warmup if warmup is not None else recipe.get("warmup")
    eval_rows = eval_rows if eval_rows is not None else recipe.get("eval_rows", 32)
    loss = loss if loss is not None else recipe.get("loss", "lm")
    if context is not None:
        from seqtool.utils import parse_length

        if seq_len is not None and seq_len != parse_length(context):
            raise BadInputError(f"--seq-len {seq_len} differs from --context {context}; --context sets the rows' length")
        seq_len = parse_length(context)
    seq_len = seq_len if seq_len is not None else 256
    requested_method = method
    method = "lora" if long_attention is not None else method
    kinds = parse_kinds(train)
    parse_loss_weights(loss)
    config = TrainConfig(steps=steps, batch=batch, grad_accum=grad_accum, lr=lr or DEFAULT_LR[method], warmup=warmup,
                         weight_decay=weight_decay, clip=clip, seed=seed, eval_every=eval_every, eval_rows=eval_rows,
                         save_every=save_every, bf16=bf16, grad_checkpoint=grad_checkpoint, progress=progress,
                         plot=plot)
    config.check()
    source_dir = Path(model).expanduser() if isinstance(model, (str, Path)) and Path(model).expanduser().is_dir() else None
    if output is not None:
        prepare_output(output, force=force, source_dir=source_dir)
    if save_adapter is not None:
        if method != "lora":
            raise BadInputError("--save-adapter needs --method lora")
        prepare_output(save_adapter, force=force)
    info = dist_mod.init(dist, resolve_device(device))
    dev = dist_mod.device_for(info, resolve_device(device))
    from seqtool.arch.io import as_loaded

    loaded = as_loaded(model, tokenizer, dtype=dtype, device=str(dev), verb="fine-tune")
    if loaded.tokenizer is None:
        raise BadInputError("fine-tuning needs a tokenizer; pass tokenizer= with a bare model")
    long_setup = None
    if context is not None:
        from seqtool.train.long_context import prepare_long_context

        long_setup = prepare_long_context(loaded.model.config, attention=long_attention, context=context,
                                          rope_scale=rope_scale, group_size=group_size, sinks=sinks,
                                          source_path=loaded.path)
    teacher_model, teacher_name, teacher_context = None, None, None
    if long_setup is not None and teacher is None and _needs_teacher(loss):
        # The original model is the teacher of a context extension, on the positions it was trained for.
        teacher_model, teacher_name = copy.deepcopy(loaded.model), f"{loaded.source} (before the extension)"
        teacher_context = long_setup.teacher_context()
    if teacher is not None:
        t = as_loaded(teacher, None, dtype=dtype, device=str(dev), verb="fine-tune")
        check_teacher_tokenizer(loaded.tokenizer, t.tokenizer)
        teacher_model, teacher_name = t.model, str(t.source)
    phases = [(steps, seq_len, batch)]
    if long_setup is not None:
        phases = long_setup.phases(steps, batch, short_frac if short_frac is not None else recipe.get("short_frac", 0.0),
                                   recipe.get("short_batch", batch), recipe.get("short_seq_len"))
    configs = [DataConfig(source=data, seq_len=length, heldout=heldout, seed=seed, mix_retrieval=mix_retrieval,
                          max_train_tokens=max(n * b * grad_accum * length, 64 * length) if data is None else None)
               for n, length, b in phases]
    data_config = configs[-1]
    cache = Path(run_dir) / "data" if run_dir is not None else None
    if info.is_main:
        parts = [build_data(loaded.tokenizer, c, cache) for c in configs]
    dist_mod.barrier(info)
    if not info.is_main:
        parts = [build_data(loaded.tokenizer, c, cache) for c in configs]
    packed = parts[0]
    if len(parts) > 1:
        packed = LengthSchedule(parts, [b for _, _, b in phases], list(itertools.accumulate(n for n, _, _ in phases)))
        packed.heldout = parts[-1].heldout  # held-out loss at the final length
    adapter_tmp = None
    if save_adapter is not None and info.is_main:
        target = Path(save_adapter).expanduser().resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        adapter_tmp = target.parent / f".seqtool-tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    save_dtype = _save_dtype(loaded)
    attention_handle = long_setup.apply(loaded.model) if long_setup is not None else None
    try:
        run = run_training(loaded.model, loaded.tokenizer, data=packed, config=config, method=method, train=kinds,
                           loss=loss, teacher=teacher_model, kl_temperature=kl_temperature, kl_top_k=kl_top_k,
                           match=match, lora=LoraOptions(rank=lora_rank, alpha=lora_alpha), run_dir=run_dir,
                           resume=resume, identity={"model": str(loaded.source), "teacher": teacher_name,
                                     "data_config": asdict(data_config),
                                     **({"long_context": long_setup.to_dict()} if long_setup else {})},
                           adapter_dir=adapter_tmp, dist=info, max_steps=max_steps, teacher_context=teacher_context)
        if attention_handle is not None:  # the saved (merged) model uses full attention
            attention_handle.remove()
        out_path, adapter_out = None, None
        if info.is_main:
            net = run.model
            if save_dtype is not None and save_dtype != next(net.parameters()).dtype:
                net = net.to(save_dtype)
            step = {"op": "finetune", "method": method, "train": kinds, "objectives": run.objectives,
                    "teacher": teacher_name, "steps": run.outcome.steps, "batch": batch, "grad_accum": grad_accum,
                    "seq_len": seq_len, "lr": config.lr, "seed": seed,
                    "data": {**packed.info, "fingerprint": packed.fingerprint},
                    "final_losses": run.outcome.final, "heldout_loss": round(run.heldout_loss, 5),
                    "processes": info.world, **(long_setup.recipe_fields() if long_setup else {})}
            if output is not None and run.outcome.steps >= steps:
                out_path = save_model(net, loaded.tokenizer, output, step=step, force=force, source_dir=loaded.path)
            if adapter_tmp is not None:
                target = Path(save_adapter).expanduser().resolve()
                if target.exists():
                    shutil.rmtree(target)
                os.replace(adapter_tmp, target)
                adapter_out = str(target)
    finally:
        if attention_handle is not None:
            attention_handle.remove()
        if adapter_tmp is not None and adapter_tmp.exists():
            shutil.rmtree(adapter_tmp, ignore_errors=True)
    result = FinetuneResult(
        source=str(loaded.source), output=str(out_path) if out_path else None, method=requested_method, train=kinds,
        objectives=run.objectives, steps=run.outcome.steps, tokens=run.outcome.tokens,
        seconds=round(time.perf_counter() - started, 3), tokens_per_s=run.outcome.tokens_per_s,
        trainable_params=run.trainable_params, total_params=run.total_params,
        data={**packed.info, "fingerprint": packed.fingerprint}, loss_first=run.outcome.first,
        loss_final=run.outcome.final, heldout_ppl_before=round(math.exp(run.heldout_loss_before), 4),
        heldout_ppl=round(math.exp(run.heldout_loss), 4), teacher=teacher_name, adapter_dir=adapter_out,
        run_dir=str(run_dir) if run_dir is not None else None, resumed_from=run.outcome.resumed_from,
        long_context=long_setup.recipe_fields() if long_setup else None)
    object.__setattr__(result, "_model", run.model)
    object.__setattr__(result, "_history", run.outcome.history)
    return result
