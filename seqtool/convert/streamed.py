"""Streamed weight-only rewrites (``convert --to gqa``, ``prune``): safetensors in, safetensors out, one decoder
layer in memory at a time.

The source is a meta-device model (shapes only). The output's names and shapes come from a second meta model
built from the rewritten config; the output is written by :func:`seqtool.arch.stream.write_streaming` in state-dict
order, so when the first tensor of layer ``i`` is due, that layer alone is materialised on the CPU from the input's
safetensors (read tensor by tensor, no memory map), rewritten in place by the conversion's own per-layer code (the
same functions the in-memory path runs, in the same compute dtype, so the outputs are bit-identical), its tensors
are written as their turn comes, and it is dropped. Tensors outside the layers are copied through. Peak memory:
one layer's input and output tensors plus the writer's current tensor, far below one input plus one output shard.

Conversions opt in with ``stream_rewrite(model, calib_ids) -> (rewrite(i, layer), reshape(model), details())``.
Calibrated ones (``--grouping key``, ``prune --criterion amp``) run their calibration forward on the model loaded
with ``device_map="auto"`` (accelerate offload, :mod:`seqtool.arch.offload`) before streaming.
"""
from __future__ import annotations

import copy
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from seqtool.arch.registry import decoder_layers, get_family, require_plain_layers
from seqtool.arch.stream import PlannedTensor, SafetensorsSource, TensorInfo, validate_streamed, write_streaming
from seqtool.errors import BadInputError

# Files of the source directory not copied to the output (weights, config and card are written anew).
_NOT_COPIED = {"config.json", "README.md", "model.safetensors.index.json"}
# Auto mode streams when the model's weights in the compute dtype exceed this fraction of available memory.
AUTO_FRACTION = 0.5


def meta_model(config: Any, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    import seqtool.models  # noqa: F401

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def weights_bytes(source: Path, dtype: torch.dtype) -> int:
    """Bytes of the checkpoint's tensors once loaded in ``dtype``."""
    src = SafetensorsSource(source)
    return sum(math.prod(src.info(n).shape) for n in src.names()) * torch.empty((), dtype=dtype).element_size()


def should_stream(source: Path, dtype: torch.dtype) -> bool:
    """Auto mode: stream when the loaded weights would take more than ``AUTO_FRACTION`` of available memory."""
    import psutil

    return weights_bytes(source, dtype) > AUTO_FRACTION * psutil.virtual_memory().available


def _materialize(layer: nn.Module, prefix: str, src: SafetensorsSource, dtype: torch.dtype) -> None:
    """Give meta ``layer`` real CPU tensors read from ``src`` (names ``prefix + key``) in ``dtype``."""
    layer.to_empty(device="cpu")
    with torch.no_grad():
        for key, tensor in layer.state_dict(keep_vars=True).items():
            name = prefix + key
            if name not in src.names_set:
                raise BadInputError(f"the checkpoint has no tensor '{name}'")
            tensor.copy_(src.get(name).to(dtype))


class _Source(SafetensorsSource):
    def __init__(self, directory: Path):
        super().__init__(directory)
        self.names_set = set(self.names())


def _passthrough(tensor: torch.Tensor, compute_dtype: torch.dtype, save_dtype: torch.dtype) -> torch.Tensor:
    """A tensor outside the layers as the in-memory path writes it (loaded in ``compute_dtype``, saved in
    ``save_dtype``), without the fp32 copy when that round trip is exact (e.g. bf16 -> fp32 -> bf16)."""
    if tensor.dtype == save_dtype and compute_dtype in (tensor.dtype, torch.float32, torch.float64):
        return tensor
    return tensor.to(compute_dtype).to(save_dtype)


def rewrite_streamed(source: Path, out_dir: Path, *, rewrite: Callable[[int, nn.Module], None],
                     reshape: Callable[[nn.Module], None], compute_dtype: torch.dtype, save_dtype: torch.dtype,
                     max_shard_bytes: int = 2 * 1024**3, progress=None) -> nn.Module:
    """Write the rewritten checkpoint's weights into ``out_dir`` (see the module docstring); returns the output's
    meta model (its config is the rewritten one)."""
    from transformers import AutoConfig

    from seqtool.arch.io import _saved_shapes

    src = _Source(source)
    hf_config = AutoConfig.from_pretrained(source, local_files_only=True, trust_remote_code=False)
    model = meta_model(hf_config, compute_dtype)
    require_plain_layers(model, "a streamed rewrite")
    shaped = meta_model(copy.deepcopy(hf_config), compute_dtype)
    reshape(shaped)
    out_model = meta_model(shaped.config, save_dtype)
    saved = _saved_shapes(out_model)
    tied = {"lm_head.weight"} if getattr(out_model.config, "tie_word_embeddings", False) else set()
    names = {id(m): n for n, m in model.named_modules()}
    prefixes = [names[id(layer)] + "." for layer in decoder_layers(model)]
    layers = decoder_layers(model)
    cache: dict[int, dict[str, torch.Tensor]] = {}

    def layer_of(name: str) -> int | None:
        return next((i for i, p in enumerate(prefixes) if name.startswith(p)), None)

    def layer_tensor(i: int, name: str) -> torch.Tensor:
        if i not in cache:
            cache.clear()  # the previous layer is done: drop its tensors before reading the next one
            layer = layers[i]
            _materialize(layer, prefixes[i], src, compute_dtype)
            rewrite(i, layer)
            cache[i] = {prefixes[i] + k: v.detach() for k, v in layer.state_dict().items()}
            layer.to_empty(device="meta")
        return cache[i].pop(name).to(save_dtype)

    plan = []
    for name, shape in saved.items():
        if name in tied:
            continue
        i = layer_of(name)
        if i is None:
            if name not in src.names_set:
                raise BadInputError(f"the checkpoint '{source}' has no tensor '{name}'")
            make = lambda name=name: _passthrough(src.get(name), compute_dtype, save_dtype)  # noqa: E731
        else:
            make = lambda i=i, name=name: layer_tensor(i, name)  # noqa: E731
        plan.append(PlannedTensor(name, TensorInfo(tuple(shape), save_dtype), make))
    write_streaming(out_dir, plan, max_shard_bytes=max_shard_bytes, progress=progress)
    cache.clear()
    return out_model


def finish_checkpoint(source: Path, out_dir: Path, out_model: nn.Module, step: dict, save_dtype: torch.dtype) -> None:
    """Config (with the recipe), card and the source's other files (tokenizer, generation config) in ``out_dir``."""
    from seqtool import recipe as recipe_mod
    from seqtool.arch.paths import read_config

    steps = [*recipe_mod.read(read_config(source)), recipe_mod.make_step(step)]
    config = out_model.config
    recipe_mod.write(config, steps)
    config.dtype = save_dtype
    config.architectures = [type(out_model).__name__]
    config.save_pretrained(out_dir)
    for item in source.iterdir():
        if item.is_file() and item.name not in _NOT_COPIED and not item.name.endswith(".safetensors"):
            shutil.copy2(item, out_dir / item.name)
    (out_dir / "README.md").write_text(recipe_mod.model_card(out_model, steps))


def convert_streamed(conversion, source: Path, output: str | Path, *, calib_ids_fn: Callable[[Any], Any],
                     force: bool, dtype: torch.dtype | None, max_shard_bytes: int,
                     make_step: Callable[[dict], dict], progress=None) -> tuple[dict, nn.Module, nn.Module, float]:
    """Run ``conversion`` streamed from checkpoint directory ``source`` into ``output`` (atomic, validated).
    ``calib_ids_fn(tokenizer)`` makes calibration ids when the conversion needs them (the model is then loaded
    offloaded for the calibration forward); ``make_step(details)`` is the recipe step recorded in the output.
    Returns (details, source meta model, output meta model, seconds)."""
    from seqtool.arch import offload
    from seqtool.arch.io import _auto_dtype, atomic_output, checkpoint_dtype, load_model
    from seqtool.arch.paths import read_config

    started = time.perf_counter()
    config = read_config(source)
    stored = checkpoint_dtype(config)
    compute_dtype = dtype or _auto_dtype(config, torch.device("cpu"))
    save_dtype = dtype or stored
    calib_ids, model = None, None
    if conversion.needs_calibration:
        setting = offload.active() or offload.Offload("auto", None)
        with offload.offloading(setting):
            loaded = load_model(str(source), dtype=compute_dtype, device="cpu", apply_recipe=False)
            calib_ids = calib_ids_fn(loaded.tokenizer)
            conversion.check(loaded.model)
            rewrite, reshape, details = conversion.stream_rewrite(loaded.model, calib_ids)
            source_meta = meta_model(loaded.model.config, compute_dtype)
            del loaded
    else:
        from transformers import AutoConfig

        source_meta = meta_model(AutoConfig.from_pretrained(source, local_files_only=True), compute_dtype)
        conversion.check(source_meta)
        rewrite, reshape, details = conversion.stream_rewrite(source_meta, None)
    with atomic_output(output, force=force, validate=validate_streamed) as tmp:
        out_model = rewrite_streamed(source, tmp, rewrite=rewrite, reshape=reshape, compute_dtype=compute_dtype,
                                     save_dtype=save_dtype, max_shard_bytes=max_shard_bytes, progress=progress)
        info = details()
        finish_checkpoint(source, tmp, out_model, make_step(info), save_dtype)
    return info, source_meta, out_model, time.perf_counter() - started


def convert_stream_or_none(conversion, model: Any, *, output, stream: bool | None, recover, in_place: bool,
                           force: bool, dtype: str, calib, samples: int, seq_len: int, seed: int,
                           max_shard_size: str | int):
    """:func:`seqtool.convert.convert`'s streamed branch: a ConvertResult when the run streams, None when it
    runs in memory (``stream=None`` and the model fits). ``stream=True`` on a run that cannot stream is a
    one-line error saying why."""
    import dataclasses

    from seqtool.arch.io import _auto_dtype, prepare_output, resolve_dtype, resolve_source
    from seqtool.arch.offload import parse_size
    from seqtool.arch.paths import read_config
    from seqtool.convert import calib as calib_mod
    from seqtool.convert.base import _STEP_DETAIL_KEYS, ConvertResult, shape_summary

    resolved = resolve_source(str(model)) if isinstance(model, (str, Path)) else None
    why = None
    if not isinstance(resolved, Path):
        why = "a checkpoint directory as MODEL (save a preset with `seqtool zoo save PRESET -o DIR`)"
    elif not hasattr(conversion, "stream_rewrite"):
        why = f"a weight-only rewrite (gqa, prune), not --to {conversion.name}"
    elif output is None or in_place:
        why = "a new output directory (-o OUT, not --in-place)"
    elif recover is not None:
        why = "no --recover (recovery trains the whole model in memory)"
    torch_dtype = resolve_dtype(dtype)
    if why is not None:
        if stream:
            raise BadInputError(f"--stream needs {why}")
        return None
    from seqtool.arch import offload

    # --device-map/--max-memory say the model does not fit: a weight rewrite then streams (it cannot rewrite
    # offloaded weights in place); otherwise auto mode streams only what would not fit in memory
    if stream is None and offload.active() is None and not should_stream(resolved, torch_dtype or _auto_dtype(read_config(resolved),
                                                                             torch.device("cpu"))):
        return None
    shard_bytes = parse_size(max_shard_size, "--max-shard-size")
    prepare_output(output, force=force, in_place=False, source_dir=resolved, source=str(model))
    calibration = None
    if conversion.needs_calibration:
        calibration = {"source": str(calib) if calib else "built-in", "samples": samples, "seq_len": seq_len,
                       "seed": seed}

    def ids(tokenizer):
        return calib_mod.calibration_ids(tokenizer, path=calib, samples=samples, seq_len=seq_len, seed=seed)

    def step(details: dict) -> dict:
        made = {**conversion.step(), **{k: v for k, v in details.items() if k in _STEP_DETAIL_KEYS}}
        if calibration:
            made["calibration"] = calibration
        return made

    details, source_meta, out_model, seconds = convert_streamed(
        conversion, resolved, output, calib_ids_fn=ids, force=force, dtype=torch_dtype,
        max_shard_bytes=shard_bytes, make_step=step)
    compute = next(source_meta.parameters()).dtype
    before, after = shape_summary(source_meta), shape_summary(meta_model(out_model.config, compute))
    spec = get_family(source_meta)
    return ConvertResult(
        op=conversion.op, method=str(details.get("method", conversion.name)), source=str(model), family=spec.family,
        output=str(Path(output).expanduser().resolve()), before=before, after=after,
        removed_ratio=round(1.0 - after.params_attn_mlp / before.params_attn_mlp, 6),
        options=dataclasses.asdict(conversion), details={**details, "streamed": True}, calibration=calibration,
        seconds=round(seconds, 3))
