"""Two-stage distillation of a freshly converted hybrid, on the training engine (:mod:`seqtool.train`).

- Stage 1, attention transfer (LoLCATs; Mamba-in-the-Llama's layer-wise stage): only the new mixers train
  (``--method full`` on the ``mixer`` kind); each converted layer's mixer output is matched (MSE, mean over the
  hidden size) to the output of the original model's attention in the same layer, both models reading the same
  tokens (:class:`PairMatch`). The teacher is the frozen original model.
- Stage 2, end to end: KL(original ‖ hybrid) of the next-token distributions; the mixers keep training fully and
  every other attention / MLP projection gets a LoRA adapter (rank ``lora_r``), merged into the weights after.

Each stage is a :class:`~seqtool.train.loop.Trainer` run with its own run directory (``run_dir/stage1``,
``run_dir/stage2``): ``resume=True`` continues a killed conversion from its last checkpoint (a finished stage
reloads its trained weights and is skipped).
"""
from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from seqtool.arch.registry import FamilySpec, decoder_layers, get_family
from seqtool.errors import BadInputError
from seqtool.train.kinds import MODULE_KINDS, register_kind
from seqtool.train.objectives import ModuleMatch, _first_tensor

SAVE_EVERY = "5m"  # with a run directory, a checkpoint every 5 minutes (a killed stage resumes bit-identically)


@dataclass
class DistillConfig:
    """What the two stages do (every field defines the run: a resume must use the same values)."""

    steps1: int
    steps2: int
    lora_r: int
    seq_len: int
    batch: int
    lr1: float
    lr2: float
    data: str | None = None
    mix_retrieval: float = 0.3
    long_frac: float = 0.25
    long_seq_len: int = 2048
    long_batch: int = 2
    kl: float = 1.0
    match: float = 1.0
    bf16: str = "on"
    seed: int = 0
    eval_rows: int = 32

    def check(self) -> None:
        for name in ("steps1", "steps2"):
            if getattr(self, name) < 0:
                raise BadInputError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.lora_r < 1:
            raise BadInputError(f"--lora-r must be at least 1, got {self.lora_r}")
        if self.seq_len < 8:
            raise BadInputError(f"--seq-len must be at least 8, got {self.seq_len}")
        if self.batch < 1 or self.long_batch < 1:
            raise BadInputError(f"--batch must be at least 1, got {min(self.batch, self.long_batch)}")
        if not 0.0 <= self.long_frac < 1.0:
            raise BadInputError(f"long_frac must be in [0, 1), got {self.long_frac}")
        if not 0.0 <= self.mix_retrieval < 1.0:
            raise BadInputError(f"--mix-retrieval must be in [0, 1), got {self.mix_retrieval}")


def mixer_module_names(model: nn.Module, spec: FamilySpec | None = None) -> list[str]:
    """Qualified names of every non-attention mixer module present (e.g. ``model.layers.1.mamba``)."""
    from seqtool.arch.registry import attention_layer_indices

    spec = spec or get_family(model)
    attention = set(attention_layer_indices(model.config))
    names = []
    for i, layer in enumerate(decoder_layers(model)):
        if i in attention:
            continue
        # a separate module (granitemoehybrid's ``mamba``) or one sitting in the attention slot (seqtool_hybrid)
        for attr in spec.mixers or (spec.attention,):
            if getattr(layer, attr, None) is not None:
                names.append(f"{spec.layers}.{i}.{attr}")
    return names


if "mixer" not in MODULE_KINDS:
    @register_kind("mixer")
    def _mixer_kind(model: nn.Module, spec: FamilySpec) -> list[str]:
        """The recurrent mixers of a hybrid (none in a plain transformer)."""
        return mixer_module_names(model, spec)


class PairMatch(ModuleMatch):
    """Attention transfer: MSE between each student module and a *differently named* teacher module
    (``pairs``: student name → teacher name, e.g. ``model.layers.1.mamba`` → ``model.layers.1.self_attn``)."""

    name = "match"

    def __init__(self, pairs: dict[str, str], weight: float = 1.0):
        super().__init__(list(pairs), weight)
        self.pairs = dict(pairs)
        # Under FSDP the gradient must pass through every sharded module's output, where FSDP re-gathers the
        # weights and reduces the gradients: a zero-weighted term on the logits makes it (stage 1's loss alone
        # reads only the mixers' outputs). Gradients are unchanged.
        self.through_logits = False

    def attach(self, student: nn.Module, teacher: nn.Module | None) -> None:
        if teacher is None:
            raise BadInputError("attention transfer needs the original model as teacher")
        self.detach()
        s_base = student.get_base_model() if hasattr(student, "get_base_model") else student
        for s_name, t_name in self.pairs.items():
            for store, model, name in ((self.student_out, s_base, s_name), (self.teacher_out, teacher, t_name)):
                def hook(_m, _inp, out, key=s_name, store=store):
                    store[key] = _first_tensor(out)

                self._handles.append(model.get_submodule(name).register_forward_hook(hook))

    def __call__(self, ctx):
        # the same loss as ModuleMatch; also logs each pair's relative error Σ|s − t|² / Σ|t|² (``rel_layer<i>``)
        mask = ctx.target_mask
        total = ctx.logits.new_zeros((), dtype=torch.float32)
        self.metrics = {}
        for name in self.modules:
            s, t = self.student_out.pop(name, None), self.teacher_out.pop(name, None)
            if s is None or t is None:
                raise RuntimeError(f"module '{name}' did not run in the student and the teacher")
            diff = (s[:, :-1].float() - t[:, :-1].float().detach()).pow(2)        # (B, L-1, hidden)
            total = total + diff.mean(-1)[mask].sum()
            with torch.no_grad():
                ref = t[:, :-1].float().pow(2).sum(-1)[mask].sum().clamp_min(1e-12)
                layer = next((p for p in name.split(".") if p.isdigit()), name)
                self.metrics[f"rel_layer{layer}"] = round(float(diff.sum(-1)[mask].sum() / ref), 5)
        if self.through_logits:
            total = total + ctx.logits.float().sum() * 0.0
        return total / len(self.modules) * ctx.token_scale


def layer_pairs(student: nn.Module, teacher: nn.Module) -> dict[str, str]:
    """Every layer: the student's mixer (converted layers) or attention (kept layers) → the teacher's attention
    of the same layer (stage 2's per-layer attention-output matching, as ``--recover distill``'s ``match``)."""
    from seqtool.arch.registry import attention_layer_indices

    t_spec, s_spec = get_family(teacher), get_family(student)
    pairs = attention_pairs(student, teacher)
    for i in attention_layer_indices(student.config):
        pairs[f"{s_spec.layers}.{i}.{s_spec.attention}"] = f"{t_spec.layers}.{i}.{t_spec.attention}"
    return pairs


def attention_pairs(student: nn.Module, teacher: nn.Module) -> dict[str, str]:
    """Student mixer → teacher attention module of the same layer."""
    t_spec = get_family(teacher)
    s_spec = get_family(student)
    pairs = {}
    for name in mixer_module_names(student, s_spec):
        layer = int(name[len(s_spec.layers) + 1:].split(".")[0])
        pairs[name] = f"{t_spec.layers}.{layer}.{t_spec.attention}"
    return pairs


@dataclass
class StageResult:
    stage: int
    steps: int
    loss_first: dict
    loss_final: dict
    heldout_loss_before: float
    heldout_loss: float
    seconds: float
    resumed_from: int | None
    match_rel_first: dict | None = None  # per layer: Σ|mixer − attention|² / Σ|attention|², first / last 10 % of steps
    match_rel_final: dict | None = None


def _stage_dir(run_dir: str | Path | None, stage: int) -> Path | None:
    return None if run_dir is None else Path(run_dir) / f"stage{stage}"


def _resume(run_dir: Path | None, resume: bool) -> bool:
    from seqtool.train.loop import CHECKPOINT

    return bool(resume and run_dir is not None and (run_dir / CHECKPOINT).exists())


def distill(student: nn.Module, teacher: nn.Module, tokenizer, config: DistillConfig, *,
            run_dir: str | Path | None = None, resume: bool = False, identity: dict | None = None,
            progress: str = "auto") -> tuple[nn.Module, list[StageResult]]:
    """Run stage 1 then stage 2 on ``student`` (a hybrid built from ``teacher``); returns the trained, merged
    student and one :class:`StageResult` per stage that ran (steps 0 skips a stage). ``teacher`` (the original
    model) is frozen during the run and handed back unchanged."""
    config.check()
    was_training, flags = teacher.training, [p.requires_grad for p in teacher.parameters()]
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    try:
        return _distill(student, teacher, tokenizer, config, run_dir=run_dir, resume=resume, identity=identity,
                        progress=progress)
    finally:  # the caller's model comes back as it was
        teacher.train(was_training)
        for p, flag in zip(teacher.parameters(), flags):
            p.requires_grad_(flag)


def _phases(config: DistillConfig, steps: int, long: bool) -> list[tuple[int, int, int]]:
    """(steps, seq_len, batch) per length phase: most steps at ``seq_len``, the last ``long_frac`` at
    ``long_seq_len`` × ``long_batch`` rows (when ``long``; stage 1 stays at ``seq_len``)."""
    n_long = round(steps * config.long_frac) if long and config.long_seq_len > config.seq_len else 0
    phases = [(steps - n_long, config.seq_len, config.batch)]
    if n_long > 0:
        phases.append((n_long, config.long_seq_len, config.long_batch))
    return [p for p in phases if p[0] > 0]


def _build_schedule(tokenizer, config: DistillConfig, cache: Path | None):
    """The rows of each stage (built-in text or ``--data``, with ``mix_retrieval`` synthetic retrieval rows):
    stage 1 at ``seq_len``; stage 2 a :class:`~seqtool.train.data.LengthSchedule` ending at ``long_seq_len``.
    The ``seq_len`` rows are one build shared by both stages (sized for the longer one)."""
    from seqtool.train.data import DataConfig, LengthSchedule, build_data

    def data_for(seq_len: int, steps: int, batch: int):
        cfg = DataConfig(source=config.data, seq_len=seq_len, seed=config.seed, mix_retrieval=config.mix_retrieval,
                         max_train_tokens=max(steps * batch * seq_len, 64 * seq_len) if config.data is None else None)
        return build_data(tokenizer, cfg, cache)

    p1 = _phases(config, config.steps1, long=False)
    p2 = _phases(config, config.steps2, long=True)
    short_steps = max([s for s, L, _ in p1 + p2 if L == config.seq_len] or [1])
    short = data_for(config.seq_len, short_steps, config.batch)
    stage2 = None
    if p2:
        parts = [short if L == config.seq_len else data_for(L, s, b) for s, L, b in p2]
        stage2 = parts[0] if len(parts) == 1 else LengthSchedule(
            parts, [b for _, _, b in p2], [sum(p[0] for p in p2[:i + 1]) for i in range(len(p2))])
    return short, stage2


def _distill(student: nn.Module, teacher: nn.Module, tokenizer, config: DistillConfig, *,
             run_dir: str | Path | None, resume: bool, identity: dict | None,
             progress: str) -> tuple[nn.Module, list[StageResult]]:
    from seqtool.train import dist as dist_mod
    from seqtool.train.loop import Trainer, TrainConfig
    from seqtool.train.objectives import KLDistill
    from seqtool.train.trainable import LoraOptions, merge, prepare

    # under torchrun every process runs both stages on its slice of each batch, FSDP-sharded like `finetune`
    info = dist_mod.init("fsdp", next(student.parameters()).device)
    created = run_dir is not None and not Path(run_dir).exists()
    try:
        cache = Path(run_dir) / "data" if run_dir is not None else None
        if info.is_main:  # rank 0 builds (and caches) the rows first, the others then read them
            data1, data2 = _build_schedule(tokenizer, config, cache)
        dist_mod.barrier(info)
        if not info.is_main:
            data1, data2 = _build_schedule(tokenizer, config, cache)
    except BadInputError:
        if created and info.is_main:  # bad --data: leave nothing behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise

    def trainer(net, data, objectives, train_config, stage):
        layers = decoder_layers(net.get_base_model() if hasattr(net, "get_base_model") else net)
        for obj in objectives:  # FSDP's backward hooks sit on the layers' outputs: stage 1 must reach them
            obj.through_logits = info.enabled
        return Trainer(net, data, objectives, train_config, teacher=teacher, run_dir=_stage_dir(run_dir, stage),
                       resume=_resume(_stage_dir(run_dir, stage), resume), identity={**ident, "stage": stage},
                       dist=info, layers=layers if info.enabled else None)
    ident = {"distill": {k: v for k, v in vars(config).items()}, **(identity or {})}
    results = []
    pairs = attention_pairs(student, teacher)
    if config.steps1 > 0 and pairs:
        net = prepare(student, "full", ["mixer"])
        template = copy.deepcopy(net) if info.enabled else None
        run = trainer(net, data1, [PairMatch(pairs)],
                      TrainConfig(steps=config.steps1, batch=config.batch, lr=config.lr1, seed=config.seed,
                                  eval_rows=config.eval_rows, bf16=config.bf16, save_every=SAVE_EVERY,
                                  progress=progress), 1)
        results.append(_run_stage(1, run))
        student = merge(_gathered(run.model, template, info))
    if config.steps2 > 0:
        torch.manual_seed(config.seed + 2)  # LoRA's random init: the same conversion gives the same model
        net = prepare(student, "lora", ["attention", "mlp"], LoraOptions(rank=config.lora_r, alpha=2 * config.lora_r))
        base = net.get_base_model()
        for name in mixer_module_names(base):  # the mixers keep training fully; LoRA on everything else
            for p in base.get_submodule(name).parameters():
                p.requires_grad_(True)
        objectives = [KLDistill(config.kl)]
        if config.match > 0:  # every layer's mixer / attention output matched to the original attention's
            objectives.append(PairMatch(layer_pairs(base, teacher), config.match))
        template = copy.deepcopy(net) if info.enabled else None
        run = trainer(net, data2, objectives,
                      TrainConfig(steps=config.steps2, batch=config.batch, lr=config.lr2, seed=config.seed + 1,
                                  eval_rows=config.eval_rows, bf16=config.bf16, save_every=SAVE_EVERY,
                                  progress=progress), 2)
        results.append(_run_stage(2, run))
        student = merge(_gathered(run.model, template, info))
    student.eval()
    return student, results


def _gathered(model: nn.Module, template: nn.Module | None, info) -> nn.Module:
    """The trained model, whole on every process: under FSDP the shards are all-gathered into ``template`` (an
    unsharded copy made before wrapping), so every rank goes on with the same merged student."""
    if template is None:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    template.load_state_dict({k: v.detach().cpu() for k, v in full.items()})
    return template


def _run_stage(stage: int, trainer) -> StageResult:
    before = trainer.heldout_loss()
    outcome = trainer.run()
    after = trainer.heldout_loss()
    tenth = max(1, len(outcome.history) // 10)

    def rel(records):
        keys = sorted({k for r in records for k in r if k.startswith("rel_layer")})
        return {k[4:]: round(sum(r[k] for r in records if k in r) / max(1, sum(k in r for r in records)), 5)
                for k in keys} or None

    return StageResult(stage, outcome.steps, outcome.first, outcome.final, round(before, 5), round(after, 5),
                       outcome.seconds, outcome.resumed_from, rel(outcome.history[:tenth]),
                       rel(outcome.history[-tenth:]))
