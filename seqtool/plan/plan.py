"""``plan_recipe``: what each step of a recipe will do to the model and how much memory it will need, from the
model's config on the meta device (no weight is read or allocated).

Per step: config changes (KV heads, pruned heads / channels, context), layer kinds, parameters before / after,
KV-cache bytes per token, recurrent-state bytes per sequence, and the predicted peak memory on the device in the
step's dtype: the largest of the step's phases (load, calibration, rewrite, training, save, validation), each a
sum of named parts (weights, activations at the step's length, KV cache, logits, gradients + optimizer state,
calibration hooks, teacher, tokenized text). The steps' own planning code decides the shapes: the prune plan
(:func:`seqtool.convert.prune.plan_prune`), the GQA check, the long-context plan of ``finetune --context``.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqtool.errors import BadInputError, NotImplementedMethodError

# save_model reloads written checkpoints up to this many parameters in full (arch.io.validate_checkpoint)
FULL_RELOAD_MAX_PARAMS = 200_000_000
SHARD_SIZE = "2GB"  # save_model's max_shard_size
COMMANDS = ("inspect", "profile", "eval", "prune", "convert", "finetune", "patch")


class UnpredictableStepError(NotImplementedMethodError):
    """A step (or an option of it) whose memory the plan does not model: one line, no number."""


@dataclass
class StepPlan:
    """The plan of one step. Bytes are in the step's compute dtype on ``device``."""

    index: int
    command: str
    options: dict
    dtype: str
    device: str
    tokens: int | None
    changes: dict[str, list]
    layer_map: list[str]
    params_before: int
    params_after: int
    kv_bytes_per_token: int
    recurrent_state_bytes: int | None
    peak_bytes: int
    peak_phase: str
    peak_parts: dict[str, int]
    phases: dict[str, int]
    notes: list[str] = field(default_factory=list)

    @property
    def params_delta(self) -> int:
        return self.params_after - self.params_before


@dataclass
class Plan:
    model: str
    device: str
    steps: list[StepPlan]

    @property
    def peak_bytes(self) -> int:
        return max((s.peak_bytes for s in self.steps), default=0)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for step, raw in zip(self.steps, out["steps"]):
            raw["params_delta"] = step.params_delta
        out["peak_bytes"] = self.peak_bytes
        return out

    def render(self) -> str:
        from tabulate import tabulate

        from seqtool.utils import format_bytes

        rows = []
        for s in self.steps:
            opts = " ".join(f"{k}={v}" for k, v in s.options.items())
            changes = ", ".join(f"{k} {a}->{b}" for k, (a, b) in s.changes.items()) or "-"
            parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in sorted(s.peak_parts.items(), key=lambda kv: -kv[1])
                              if v > 0)
            rows.append([s.index, f"{s.command} {opts}".strip(), s.tokens or "-", s.dtype, changes,
                         f"{s.params_after:,} ({s.params_delta:+,})", format_bytes(s.kv_bytes_per_token),
                         format_bytes(s.peak_bytes), f"{s.peak_phase}: {parts}" if parts else s.peak_phase])
        table = tabulate(rows, headers=["#", "step", "tokens", "dtype", "changes", "params (delta)", "KV/token",
                                        "peak memory", "at (largest parts)"], tablefmt="simple",
                         disable_numparse=True)
        lines = [f"plan for {self.model} on {self.device} (meta tensors, no weights loaded)", table,
                 f"peak memory over the recipe: {format_bytes(self.peak_bytes)} (above the Python runtime)"]
        for s in self.steps:
            lines += [f"  step {s.index} ({s.command}): {n}" for n in s.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- state


@dataclass
class _State:
    """The model a step starts from: its config, where its weights would come from, and their dtype on disk."""

    source: str
    config: Any
    tokenizer: Any
    on_disk: bool  # a checkpoint directory (weights read from files) or a preset built in memory
    file_dtype: Any  # torch dtype of the checkpoint files (presets: their build dtype)
    preset: str | None


def _initial_state(model: str) -> _State:
    from seqtool.arch.io import checkpoint_dtype, load_model
    from seqtool.arch.paths import check_source
    from seqtool.zoo import presets

    resolved = check_source(model)
    loaded = load_model(model, dtype=None, device="cpu", meta=True, apply_recipe=False)
    config = loaded.model.config
    if isinstance(resolved, Path):
        import json

        file_dtype = checkpoint_dtype(json.loads((resolved / "config.json").read_text()))
        return _State(model, config, loaded.tokenizer, True, file_dtype, None)
    return _State(model, config, loaded.tokenizer, False, presets.default_preset_dtype(resolved), resolved)


def _meta_model(config: Any, dtype: Any):
    import torch
    from transformers import AutoModelForCausalLM

    import seqtool.models  # noqa: F401  (registers seqtool's own classes)

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _dtype_name(dtype) -> str:
    from seqtool.arch.io import DTYPE_NAMES

    return DTYPE_NAMES.get(dtype, str(dtype))


def _compute_dtype(state: _State, requested: str | None, device: str, command: str):
    """The dtype the step's command runs in: ``--dtype``, else the command's default (finetune: fp32; others:
    the checkpoint's dtype, upcast to fp32 on CPU; presets: their own dtype)."""
    import torch

    from seqtool.arch.io import resolve_dtype

    chosen = resolve_dtype(requested) if requested is not None else None
    if chosen is not None:
        return chosen
    if command == "finetune":
        return torch.float32
    if state.on_disk:
        return torch.float32 if device == "cpu" else state.file_dtype
    return state.file_dtype


# ---------------------------------------------------------------------------------------------- helpers


_TOKEN_STATS: dict[int, tuple[float, float]] = {}


def _token_stats(tokenizer) -> tuple[float, float]:
    """(characters per token, share of ids above 256) of ``tokenizer`` on 20 000 characters of the built-in
    held-out text (a tokenizer is not weights: loading and running it is cheap)."""
    from seqtool.zoo.corpus import load_text

    key = id(tokenizer)
    if key not in _TOKEN_STATS:
        sample = load_text("heldout", 20_000)
        if tokenizer is None or not sample:
            return 1.0, 1.0
        ids = tokenizer(sample, add_special_tokens=False, verbose=False)["input_ids"]
        _TOKEN_STATS[key] = (len(sample) / max(len(ids), 1), sum(i > 256 for i in ids) / max(len(ids), 1))
    return _TOKEN_STATS[key]


def _text_bytes(tokenizer, chars: int) -> int:
    from seqtool.plan.memory import tokenize_bytes

    return tokenize_bytes(chars, *_token_stats(tokenizer))


def _require_plain(config: Any, command: str) -> None:
    from seqtool.arch.registry import layer_kinds

    for idx, kind in enumerate(layer_kinds(config)):
        if not kind.plain:
            raise UnpredictableStepError(f"step '{command}': memory plans model plain attention + dense MLP layers; "
                                         f"layer {idx} is '{kind.describe()}'")


def _recurrent_state_bytes(config: Any) -> int | None:
    from seqtool.arch.registry import layer_kinds

    return 0 if all(k.mixer == "attention" for k in layer_kinds(config)) else None


# Options that change where results go or how progress shows, not what is held in memory.
_NEUTRAL = {"output", "force", "in_place", "run_dir", "resume", "threads", "progress", "quiet", "json", "json_out",
            "plot", "eval_every", "save_every", "seed", "max_seconds", "csv", "csv_path", "plot_path",
            "fail_under", "fail_over"}  # CI gates read results; they hold nothing


def _take(options: dict, command: str, allowed: dict[str, Any]) -> dict[str, Any]:
    """``allowed`` defaults overridden by ``options``; an option outside ``allowed`` is an unpredictable step."""
    options = {k: v for k, v in options.items() if k not in _NEUTRAL or k in allowed}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UnpredictableStepError(f"step '{command}': the memory plan does not model option(s) "
                                     f"{', '.join(unknown)}")
    return {**allowed, **{k: v for k, v in options.items() if v is not None}}


def _length(value: int | str) -> int:
    """A length option: an integer or "2k"-style text."""
    from seqtool.utils import parse_length

    return parse_length(value)


def _load_parts(state: _State, model, device: str) -> dict[str, int]:
    """Loading: a checkpoint's files are memory-mapped while the weights are copied out of them (CPU); a preset
    built from its config allocates an untied LM head before tying it to the embeddings."""
    from seqtool.plan.memory import dims, weight_bytes

    parts = {"weights": weight_bytes(model)}
    if state.on_disk and device == "cpu":
        parts["checkpoint file pages"] = _file_bytes(state, model)
    elif not state.on_disk and getattr(model.config, "tie_word_embeddings", False):
        _, hidden, _, _, _, _, vocab = dims(model.config)
        parts["LM head before tying"] = vocab * hidden * next(model.parameters()).element_size()
    return parts


def _shards(model, save_dtype) -> list[tuple[int, int, int]]:
    """(file bytes, largest tensor bytes, its elements) per safetensors shard that ``save_model`` writes, from
    the same sharding function transformers uses (huggingface_hub, 2GB shards, tied weights written once)."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards

    from seqtool.arch.io import _tied_keys

    tied = _tied_keys(model) | ({"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set())
    state = {k: torch.empty(v.shape, dtype=save_dtype, device="meta") for k, v in model.state_dict().items()
             if k not in tied}
    split = split_torch_state_dict_into_shards(state, max_shard_size=SHARD_SIZE)
    out = []
    for names in split.filename_to_tensors.values():
        sizes = [(state[n].numel() * state[n].element_size(), state[n].numel()) for n in names]
        largest = max(sizes)
        out.append((sum(b for b, _ in sizes), largest[0], largest[1]))
    return out


def _save_phases(model_after, compute_b: int, save_dtype, device: str) -> list:
    """Writing a checkpoint (save_model): a cast copy of the state dict when the file dtype differs, then
    validation (arch.io.validate_checkpoint): every tensor of a shard read back through its memory map (the
    shard's pages stay resident until the file is closed) with an isfinite mask, and, up to 200M parameters, a
    full reload (weights in the file dtype + the mapped file)."""
    from seqtool.plan.memory import Phase

    save_b = save_dtype.itemsize
    n_params = sum(p.numel() for p in model_after.parameters())
    weights = n_params * compute_b
    save = {"weights": weights}
    if save_b != compute_b:
        save["state dict cast to the file dtype"] = n_params * save_b
    if device != "cpu":
        return [Phase("save", save)]
    # per shard: all its pages once read, or the largest tensor's pages + its copy + its mask
    read_back = max(max(size, 2 * big + numel) for size, big, numel in _shards(model_after, save_dtype))
    phases = [Phase("save", save), Phase("validate", {"weights": weights, "written shard read back": read_back})]
    if n_params <= FULL_RELOAD_MAX_PARAMS:
        phases.append(Phase("validate (reload)", {"weights": weights, "reloaded weights": n_params * save_b,
                                                  "checkpoint file pages": n_params * save_b}))
    return phases


# ---------------------------------------------------------------------------------------------- steps


@dataclass
class _Outcome:
    phases: list
    tokens: int | None = None
    config: Any = None  # the config after the step (None: unchanged)
    writes: bool = False  # the step saves a checkpoint the next step loads
    save_dtype: Any = None
    notes: list[str] = field(default_factory=list)


def _plan_inspect(state, model, options, b, device, dtype) -> _Outcome:
    from seqtool.plan.memory import Phase

    _take(options, "inspect", {})
    return _Outcome([Phase("shapes", {})], notes=["inspect builds the model on the meta device: no weights"])


def _plan_profile(state, model, options, b, device, dtype) -> _Outcome:
    from seqtool.plan.memory import Phase, weight_bytes
    from seqtool.profile import estimate as est

    o = _take(options, "profile", {"seq_len": "2k", "sweep": None, "batch": 1, "decode_tokens": 32, "warmup": 1,
                                   "repeats": 3, "attn": None, "threads": None, "max_seconds": None})
    if o["attn"] not in (None, "sdpa", "eager"):
        raise UnpredictableStepError(f"step 'profile': attention patch '{o['attn']}' is not modelled (sdpa or eager)")
    _require_plain(model.config, "profile")
    if o["sweep"]:
        from seqtool.utils import parse_length_list

        lengths = parse_length_list(o["sweep"]) if isinstance(o["sweep"], str) else [_length(x) for x in o["sweep"]]
    else:
        lengths = [_length(o["seq_len"])]
    weights = weight_bytes(model)
    phases = [Phase("load", _load_parts(state, model, device))]
    for length in lengths:
        e = est.estimate_memory(model.config, weight_bytes=weights, bytes_per_element=b, batch=o["batch"],
                                seq_len=length, decode_tokens=o["decode_tokens"], attn=o["attn"])
        phases.append(Phase(f"prefill {length}", {"weights": e.weights, "kv cache": e.kv_cache,
                                                  "activations": e.activations}))
    notes = ["on CPU each length is measured in its own process; this is that process's peak"] if device == "cpu" else []
    return _Outcome(phases, tokens=max(lengths) + o["decode_tokens"], notes=notes)


def _file_bytes(state: _State, model) -> int:
    n = sum(p.numel() for p in model.parameters())
    return n * state.file_dtype.itemsize


def _plan_eval(state, model, options, b, device, dtype) -> _Outcome:
    from seqtool.eval.runner import FILLER_CHARS, PPL_TOKENS, parse_tasks
    from seqtool.plan.memory import Phase, dims, forward_bytes, id_list_bytes, kv_bytes, weight_bytes

    o = _take(options, "eval", {"task": "ppl", "tasks": None, "seq_len": 2048, "seq_lens": None,
                                "ppl_tokens": PPL_TOKENS, "stride": None, "attn": None, "samples": 20,
                                "depths": None, "batch": 1, "data": None, "compare": None, "recall": False})
    for name in ("data", "compare"):
        if o[name]:
            raise UnpredictableStepError(f"step 'eval': --{name} is not modelled")
    tasks = parse_tasks(o["tasks"] or o["task"])
    if tasks != ["ppl"]:
        raise UnpredictableStepError(f"step 'eval': only the ppl task is modelled, not {', '.join(t for t in tasks if t != 'ppl')}")
    if o["attn"] not in (None, "sdpa"):
        raise UnpredictableStepError(f"step 'eval': attention '{o['attn']}' is not modelled (sdpa)")
    _require_plain(model.config, "eval")
    lengths = o["seq_lens"] or [o["seq_len"]]
    lengths = [_length(x) for x in (lengths.split(",") if isinstance(lengths, str) else lengths)]
    T = max(lengths)
    _, _, _, _, _, _, vocab = dims(model.config)
    weights = weight_bytes(model)
    chars_per_token, large_ids = _token_stats(state.tokenizer)
    stream_tokens = int(FILLER_CHARS / chars_per_token)
    tokens = min(stream_tokens, _length(o["ppl_tokens"] or 10**12))
    stream = int(stream_tokens * (id_list_bytes(large_ids) + 8))  # the id list, then its int64 array
    use_cache = bool(getattr(model.config, "use_cache", True))
    kv = kv_bytes(model.config, tokens=T, batch=1, b=b) if use_cache else 0
    # More than one window: the previous window's fp32 logits are still referenced during the next forward, and
    # its KV cache (a reference cycle) until the garbage collector runs.
    several = tokens > T - 1
    prev = {"previous window's logits": T * vocab * 4, "previous window's kv cache": kv} if several else {}
    base = {"weights": weights, "tokenized text": stream, **prev}
    phases = [Phase("load", _load_parts(state, model, device)),
              Phase("forward", {**base, "kv cache": kv,
                                "activations": max(forward_bytes(model.config, batch=1, seq_len=T, b=b),
                                                   T * vocab * b)})]
    if b != 4:
        phases.append(Phase("logits to fp32", {**base, "kv cache": kv, "logits": T * vocab * b,
                                               "fp32 logits": T * vocab * 4}))
    base = {"weights": weights, "tokenized text": stream}
    phases.append(Phase("cross-entropy", {**base, "fp32 logits": T * vocab * 4, "log-softmax": T * vocab * 4}))
    return _Outcome(phases, tokens=T)


def _calibration_phase(state, model, b: int, samples: int, seq_len: int, amp_hook: bool):
    """Calibration forwards (convert.calib.run_batches: batches of 8 windows, no cache, last logits only), with
    prune's AMP hook (per chunk of <= 2048 tokens an fp32 (tokens, heads, hidden) contribution and its abs)."""
    from seqtool.plan.memory import Phase, dims, forward_bytes, weight_bytes

    _, hidden, heads, _, head_dim, _, vocab = dims(model.config)
    batch = min(8, samples)
    n = batch * seq_len
    act = forward_bytes(model.config, batch=batch, seq_len=seq_len, b=b)
    hook = 0
    if amp_hook:
        chunk = min(2048, n)
        hook = 2 * chunk * heads * hidden * 4
        if b != 4:  # fp32 copies of the o_proj input and weight
            hook += n * heads * head_dim * 4 + hidden * heads * head_dim * 4
        in_flight = n * (2 * hidden + 2 * heads * head_dim) * b  # residual, normed input, attention output + copy
        act = max(act, in_flight + hook)
    text = _text_bytes(state.tokenizer, samples * seq_len * 8)
    return Phase("calibration", {"weights": weight_bytes(model), "activations + hooks": act,
                                 "calibration text": text, "logits": batch * vocab * 4})


def _rewrite_phase(model_before, model_after) -> Any:
    """Rewriting layers in place: every layer's new tensors exist beside its old ones for a moment."""
    from seqtool.arch.registry import decoder_layers
    from seqtool.plan.memory import Phase, weight_bytes

    layer_new = max(sum(p.numel() * p.element_size() for p in layer.parameters())
                    for layer in decoder_layers(model_after))
    return Phase("rewrite", {"weights": weight_bytes(model_before), "one rewritten layer": layer_new})


def _save_dtype(state: _State, requested: str | None, compute):
    """The dtype a convert / prune / patch output is written in: --dtype, else the source's (convert.base)."""
    from seqtool.arch.io import resolve_dtype

    chosen = resolve_dtype(requested) if requested is not None else None
    return chosen or (state.file_dtype if state.on_disk else compute)


def _no_recover(o: dict, command: str) -> None:
    if o.get("recover") not in (None, "none"):
        raise UnpredictableStepError(f"step '{command}': --recover {o['recover']} is not modelled; plan the recovery "
                                     "as its own finetune step")


def _plan_prune(state, model, options, b, device, dtype) -> _Outcome:
    from seqtool.convert.prune import PruneConversion, parse_targets, plan_prune
    from seqtool.plan.memory import Phase

    o = _take(options, "prune", {"ratio": None, "target": "heads,mlp", "criterion": "amp", "round_to": None,
                                 "gqa_unit": "query", "calib": None, "samples": 50, "seq_len": 128, "seed": 0,
                                 "recover": None, "steps": None, "force": None, "in_place": None})
    _no_recover(o, "prune")
    if o["ratio"] is None:
        raise BadInputError("step 'prune' needs ratio")
    if o["calib"] is not None:
        raise UnpredictableStepError("step 'prune': a --calib file is not modelled (built-in text only)")
    conv = PruneConversion(ratio=o["ratio"], target=o["target"], criterion=o["criterion"], round_to=o["round_to"],
                           gqa_unit=o["gqa_unit"], seed=o["seed"])
    conv.check(model)  # the command's own checks, on meta tensors
    p = plan_prune(model, float(o["ratio"]), parse_targets(conv.target), conv.round_to, conv.gqa_unit)
    from seqtool.arch.registry import get_family

    keys = get_family(model).config_keys
    _, _, head_dim = _heads(model.config)
    after = copy.deepcopy(model.config)
    setattr(after, keys["heads"], p.heads)
    setattr(after, keys["kv_heads"], p.kv_heads)
    setattr(after, keys["head_dim"], head_dim)
    setattr(after, keys["intermediate"], p.intermediate)
    model_after = _meta_model(after, next(model.parameters()).dtype)
    phases = [Phase("load", _load_parts(state, model, device))]
    if conv.needs_calibration:
        phases.append(_calibration_phase(state, model, b, o["samples"], _length(o["seq_len"]), amp_hook=True))
    phases.append(_rewrite_phase(model, model_after))
    phases += _save_phases(model_after, b, _save_dtype(state, dtype, next(model.parameters()).dtype), device)
    return _Outcome(phases, tokens=_length(o["seq_len"]) if conv.needs_calibration else None, config=after, writes=True,
                    notes=[f"removes {p.units_removed} {p.unit} unit(s) and {p.channels_removed} MLP channels per "
                           f"layer (ratio {p.expected_ratio:.3f})"])


def _heads(config):
    from seqtool.arch.registry import head_counts

    return head_counts(config)


def _plan_convert(state, model, options, b, device, dtype) -> _Outcome:
    from seqtool.convert.pipeline import make_conversion
    from seqtool.plan.memory import Phase

    o = dict(options)
    to = o.pop("to", None)
    if to != "gqa":
        raise UnpredictableStepError(f"step 'convert --to {to}': only --to gqa is modelled")
    run = {k: o.pop(k) for k in ("calib", "samples", "seq_len", "seed", "recover", "steps", "force", "in_place")
           if k in o}
    _no_recover(run, "convert")
    if run.get("calib") is not None:
        raise UnpredictableStepError("step 'convert': a --calib file is not modelled (built-in text only)")
    conv = make_conversion(to, o)
    conv.check(model)
    from seqtool.arch.registry import get_family

    after = copy.deepcopy(model.config)
    setattr(after, get_family(model).config_keys["kv_heads"], conv.kv_heads)
    model_after = _meta_model(after, next(model.parameters()).dtype)
    phases = [Phase("load", _load_parts(state, model, device))]
    samples, seq_len = run.get("samples") or 50, _length(run.get("seq_len") or 128)
    if conv.needs_calibration:
        phases.append(_calibration_phase(state, model, b, samples, seq_len, amp_hook=False))
    phases.append(_rewrite_phase(model, model_after))
    phases += _save_phases(model_after, b, _save_dtype(state, dtype, next(model.parameters()).dtype), device)
    return _Outcome(phases, tokens=seq_len if conv.needs_calibration else None, config=after, writes=True)


def _plan_finetune(state, model, options, b, device, dtype) -> _Outcome:
    from seqtool.plan.memory import (Phase, dims, lora_params, loss_bytes, training_saved_bytes_per_token,
                                     weight_bytes)
    from seqtool.train.kinds import DEFAULT_KINDS, parse_kinds

    o = _take(options, "finetune", {
        "steps": None, "data": None, "method": "lora", "train": None, "loss": "lm", "teacher": None,
        "kl_temperature": 1.0, "kl_top_k": None, "match": "attention", "seq_len": None, "batch": None,
        "grad_accum": 1, "lr": None, "warmup": None, "weight_decay": 0.0, "clip": 1.0, "seed": 0,
        "mix_retrieval": None, "heldout": 0.05, "eval_every": 0, "eval_rows": 32, "run_dir": None, "resume": False,
        "save_every": None, "save_adapter": None, "lora_rank": 8, "lora_alpha": 16, "grad_checkpoint": False,
        "bf16": "auto", "dist": "fsdp", "progress": None, "plot": False, "force": None, "context": None,
        "rope_scale": None, "group_size": None, "sinks": None, "threads": None})
    from seqtool.train.long_context import LONG_METHODS, LONG_RECIPE, prepare_long_context

    method = o["method"]
    if method not in ("lora", "full") and method not in LONG_METHODS:
        raise BadInputError(f"step 'finetune': unknown method '{method}'")
    if o["data"] is not None:
        raise UnpredictableStepError("step 'finetune': --data files are not modelled (built-in corpus only)")
    from seqtool.train.objectives import parse_loss_weights

    objectives = set(parse_loss_weights(o["loss"]) if isinstance(o["loss"], str) else o["loss"])
    if objectives - {"lm", "kl"} or o["kl_top_k"] is not None:
        raise UnpredictableStepError(f"step 'finetune': only the lm and kl objectives are modelled, not "
                                     f"{o['loss']}" + (" with kl_top_k" if o["kl_top_k"] is not None else ""))
    if "kl" in objectives and o["teacher"] is None:
        raise BadInputError("step 'finetune': the kl objective needs a teacher")
    if o["bf16"] == "on" or (o["bf16"] == "auto" and device != "cpu"):
        raise UnpredictableStepError("step 'finetune': bf16 autocast is not modelled (CPU, --bf16 off)")
    _require_plain(model.config, "finetune")
    recipe = LONG_RECIPE if o["context"] is not None else {}
    notes, after = [], None
    seq_len = _length(o["seq_len"]) if o["seq_len"] else 256
    if o["context"] is not None:
        long_attention = method if method in LONG_METHODS else None
        setup = prepare_long_context(model.config, attention=long_attention, context=o["context"],
                                     rope_scale=o["rope_scale"], group_size=o["group_size"], sinks=o["sinks"],
                                     source_path=None)
        seq_len = setup.plan.context
        after = copy.deepcopy(model.config)
        after.max_position_embeddings = setup.plan.max_position_embeddings
        if setup.plan.rope_parameters is not None:
            after.rope_parameters = dict(setup.plan.rope_parameters)
        notes.append(setup.describe())
    elif method in LONG_METHODS:
        raise BadInputError(f"step 'finetune': --method {method} needs context")
    kinds = parse_kinds(o["train"] or recipe.get("train", ",".join(DEFAULT_KINDS)))
    if set(kinds) - {"attention", "mlp"} and method != "full" and method not in LONG_METHODS:
        raise UnpredictableStepError(f"step 'finetune': LoRA on {','.join(kinds)} is not modelled (attention,mlp)")
    batch = o["batch"] or recipe.get("batch", 8)
    steps = o["steps"] or recipe.get("steps")
    n = batch * seq_len
    n_layers, _, _, _, _, _, vocab = dims(model.config)
    weights = weight_bytes(model)
    adapter_b = 4 if b < 4 else b  # peft keeps adapters in fp32 on half-precision models
    full_kinds: set[str] = set()
    if method == "full":
        from seqtool.train.kinds import kind_modules

        names = [n_ for names in kind_modules(model, kinds).values() for n_ in names]
        trainable = sum(p.numel() for name in names for p in model.get_submodule(name).parameters())
        adapted, rank, state_b = set(), None, b
        full_kinds = set(kinds)
    else:
        lora_kinds = [k for k in kinds if k in ("attention", "mlp")]
        trainable, adapted = lora_params(model.config, o["lora_rank"], lora_kinds)
        rank, state_b = o["lora_rank"], adapter_b
        extra = [k for k in kinds if k not in ("attention", "mlp")]
        if extra:  # embed / norm are trained in full beside the adapters (modules_to_save copies them)
            raise UnpredictableStepError(f"step 'finetune': training {','.join(extra)} beside LoRA is not modelled")
    per_token = training_saved_bytes_per_token(model.config, b=b, lora_rank=rank, adapted=adapted,
                                               adapter_b=adapter_b, full_kinds=full_kinds)
    hidden = dims(model.config)[1]
    if o["grad_checkpoint"]:
        saved = n * (n_layers * hidden * b + per_token)  # layer inputs + one layer recomputed at a time
    else:
        saved = n * n_layers * per_token
    saved += n * hidden * 4 * 2  # final norm's fp32 input and output
    optim = trainable * state_b * 4  # parameters (adapters) + gradients + AdamW's two moments
    if method == "full":
        optim = trainable * state_b * 3  # the weights themselves are already counted
    from seqtool.train.data import _MAX_HELDOUT_ROWS, _builtin_docs

    max_chars = max(steps * batch * o["grad_accum"] * seq_len, 64 * seq_len) * 6
    chars = sum(map(len, _builtin_docs("train", max_chars)))
    chars += sum(map(len, _builtin_docs("heldout", min(_MAX_HELDOUT_ROWS * seq_len * 6, 2_000_000))))
    text = _text_bytes(state.tokenizer, chars)
    base = {"weights": weights, "tokenized text": text, "trainable + gradients + AdamW": optim,
            "activations (saved for backward)": saved}
    phases = [Phase("load", _load_parts(state, model, device))]
    if o["teacher"] is None:
        phases.append(Phase("train step", {**base, "logits + loss gradients": loss_bytes(n, vocab, b)}))
    else:
        phases += _teacher_phases(state, o["teacher"], model, base, objectives, n=n, batch=batch,
                                  seq_len=seq_len, vocab=vocab, b=b, device=device)
    save_dtype = state.file_dtype if state.on_disk else next(model.parameters()).dtype
    model_after = _meta_model(after or model.config, save_dtype)
    phases += _save_phases(model_after, save_dtype.itemsize, save_dtype, device)
    return _Outcome(phases, tokens=seq_len, config=after, writes=True, save_dtype=save_dtype,
                    notes=notes + [f"{trainable:,} trainable parameters ({method})"])


def _teacher_phases(state, teacher: str, model, base: dict, objectives: set[str], *, n: int, batch: int,
                    seq_len: int, vocab: int, b: int, device: str) -> list:
    """A frozen teacher (finetune --teacher, loss kl): its weights (same dtype as the student), its no-grad
    forward after the student's (its layer activations and logits beside everything the student keeps), then the
    objectives: the LM loss keeps its fp32 log-softmax; KL (train.objectives.KLDistill) builds fp32 student and
    teacher logits, both log-softmaxes, the teacher's probabilities, their difference and its product with them
    (7 fp32 (tokens, V) tensors at once), and keeps log q and p for backward."""
    from seqtool.plan.memory import Phase, forward_bytes, weight_bytes

    if teacher == state.source:
        teacher_model = model
    else:
        teacher_state = _initial_state(teacher)
        teacher_model = _meta_model(teacher_state.config, next(model.parameters()).dtype)
        _require_plain(teacher_model.config, "finetune --teacher")
    parts = {**base, "teacher weights": weight_bytes(teacher_model), "logits": n * vocab * b,
             "teacher logits": n * vocab * b}
    forward = Phase("teacher forward", {**parts, "teacher activations": forward_bytes(
        teacher_model.config, batch=batch, seq_len=seq_len, b=b)})
    lm_kept = n * vocab * 4 if "lm" in objectives else 0
    kl = Phase("objectives", {**parts, "lm log-softmax": lm_kept, "kl fp32 temporaries": 7 * n * vocab * 4})
    backward = Phase("backward start", {**parts, "lm log-softmax": lm_kept, "kl kept for backward": 2 * n * vocab * 4,
                                        "loss gradients": 3 * n * vocab * 4})
    return [forward, kl, backward]


def _plan_patch(state, model, options, b, device, dtype) -> _Outcome:
    from seqtool.plan.memory import Phase

    o = _take(options, "patch", {"method": None, "budget": None, "dense_layers": None, "set_options": None,
                                 "set": None, "report": False, "probe_tokens": 512, "force": None, "in_place": None})
    if o["report"]:
        raise UnpredictableStepError("step 'patch': --report (a probe run with recall meters) is not modelled")
    phases = [Phase("load", _load_parts(state, model, device))]
    phases += _save_phases(model, b, _save_dtype(state, dtype, next(model.parameters()).dtype), device)
    return _Outcome(phases, writes=True, notes=[f"patch {o['method']}: weights unchanged; KV/token is the dense "
                                                "cache's (a cache-evicting method keeps at most its budget)"])


_PLANNERS = {"inspect": _plan_inspect, "profile": _plan_profile, "eval": _plan_eval, "prune": _plan_prune,
             "convert": _plan_convert, "finetune": _plan_finetune, "patch": _plan_patch}


def _changes(before, after) -> dict[str, list]:
    from seqtool.arch.registry import get_family

    if after is None:
        return {}
    keys = get_family(before).config_keys
    out = {}
    for name in ("heads", "kv_heads", "head_dim", "intermediate", "layers"):
        key = keys.get(name)
        a, c = getattr(before, key, None) if key else None, getattr(after, key, None) if key else None
        if a != c:
            out[name] = [a, c]
    for key in ("max_position_embeddings",):
        if getattr(before, key, None) != getattr(after, key, None):
            out[key] = [getattr(before, key, None), getattr(after, key, None)]
    return out


def plan_recipe(model: str, steps: list[tuple[str, dict]], *, device: str = "cpu", dtype: str | None = None) -> Plan:
    """Plan ``steps`` ((command, options) pairs, options named like the CLI's with underscores) on ``model``
    (preset or checkpoint directory) without loading weights. ``dtype`` overrides every step's default dtype.
    A step or option whose memory is not modelled raises :class:`UnpredictableStepError` (one line)."""
    from seqtool.arch.inspect import layer_map
    from seqtool.arch.io import resolve_device
    from seqtool.arch.registry import kv_cache_bytes_per_token, layer_kinds
    from seqtool.plan.memory import peak

    # a plan is for a device, not on it: planning for cuda needs no GPU here
    device = "cuda" if str(device).startswith("cuda") else resolve_device(device).type
    state = _initial_state(model)
    plans = []
    for index, (command, options) in enumerate(steps):
        if command not in _PLANNERS:
            raise UnpredictableStepError(f"step {index} '{command}': no memory plan for this step "
                                         f"(planned: {', '.join(COMMANDS)})")
        options = dict(options or {})
        step_dtype = options.pop("dtype", None) or dtype
        options.pop("device", None)
        compute = _compute_dtype(state, step_dtype, device, command)
        meta = _meta_model(state.config, compute)
        b = compute.itemsize
        params_before = sum(p.numel() for p in meta.parameters())
        outcome = _PLANNERS[command](state, meta, options, b, device, step_dtype)
        top = peak(outcome.phases)
        config_after = outcome.config or state.config
        meta_after = meta if outcome.config is None else _meta_model(config_after, compute)
        plans.append(StepPlan(
            index=index, command=command, options=options, dtype=_dtype_name(compute), device=device,
            tokens=outcome.tokens, changes=_changes(state.config, outcome.config),
            layer_map=layer_map(layer_kinds(config_after)), params_before=params_before,
            params_after=sum(p.numel() for p in meta_after.parameters()),
            kv_bytes_per_token=kv_cache_bytes_per_token(config_after, b),
            recurrent_state_bytes=_recurrent_state_bytes(config_after), peak_bytes=top.total, peak_phase=top.name,
            peak_parts=dict(top.parts), phases={p.name: p.total for p in outcome.phases}, notes=outcome.notes))
        if outcome.writes:
            save_dtype = outcome.save_dtype
            if save_dtype is None:
                from seqtool.arch.io import resolve_dtype

                save_dtype = (resolve_dtype(step_dtype) if step_dtype else None) or (
                    state.file_dtype if state.on_disk else compute)
            state = _State(f"<output of step {index}>", config_after, state.tokenizer, True, save_dtype, None)
    return Plan(model=model, device=device, steps=plans)
