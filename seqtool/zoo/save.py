"""``seqtool zoo save PRESET -o OUT``: write a random-weight preset to disk one tensor at a time.

The model is never materialised: its names and shapes come from a meta-device model, and every tensor is drawn
(from its own generator, seeded by ``seed`` and the tensor's name), written to the current safetensors shard and
freed (:func:`seqtool.arch.stream.write_streaming`). Peak memory is one tensor (plus a 4 M-element fp32 chunk),
so a real-shape 8B preset (16 GB in bf16) is written on a machine with far less RAM.

Values follow transformers' ``_init_weights`` scheme (linear / embedding weights ~ N(0, initializer_range),
biases 0, norm weights 1) but are not the same numbers as :func:`seqtool.zoo.presets.build_preset` (whose
values come from one global RNG stream over the whole in-memory model).
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from seqtool.arch.stream import CHUNK, PlannedTensor, TensorInfo, validate_streamed, write_streaming
from seqtool.zoo import presets


@dataclass
class SavedPreset:
    """What :func:`save_preset` wrote."""

    preset: str
    output: str
    dtype: str
    tensors: int
    bytes: int
    shards: int
    seconds: float


def _init_kind(model: nn.Module) -> dict[str, str]:
    """Per parameter name: 'normal' (linear / embedding weights), 'zeros' (biases) or 'ones' (norm weights)."""
    kinds = {}
    for prefix, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            name = f"{prefix}.{pname}" if prefix else pname
            if pname == "bias":
                kinds[name] = "zeros"
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                kinds[name] = "normal"
            else:
                kinds[name] = "ones"
    return kinds


def random_tensor(name: str, info: TensorInfo, kind: str, *, std: float, seed: int) -> torch.Tensor:
    """One preset tensor, drawn from a generator seeded by ``seed`` and ``name`` in fp32 chunks of ``CHUNK``
    elements and cast to ``info.dtype`` (the same values whatever else is written)."""
    if kind == "ones":
        return torch.ones(info.shape, dtype=info.dtype)
    if kind == "zeros":
        return torch.zeros(info.shape, dtype=info.dtype)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    out = torch.empty(info.shape, dtype=info.dtype)
    flat = out.view(-1)
    for start in range(0, flat.numel(), CHUNK):
        n = min(CHUNK, flat.numel() - start)
        flat[start:start + n] = (torch.randn(n, generator=gen) * std).to(info.dtype)
    return out


def plan_preset(name: str, dtype: torch.dtype | None = None, *, seed: int = 0) -> tuple[object, list[PlannedTensor]]:
    """(transformers config, planned tensors) of preset ``name``: every tensor ``save_pretrained`` would write."""
    from transformers import AutoModelForCausalLM

    config = presets.preset_config(name)
    dtype = dtype or presets.default_preset_dtype(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    kinds = _init_kind(model)
    std = float(getattr(config, "initializer_range", None) or 0.02)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    plan = []
    for key, tensor in model.state_dict().items():
        if key in tied or key not in kinds:
            continue
        info = TensorInfo(tuple(tensor.shape), dtype)
        plan.append(PlannedTensor(key, info, lambda key=key, info=info: random_tensor(
            key, info, kinds[key], std=std, seed=seed)))
    return config, plan


def save_preset(name: str, output: str | Path, *, dtype: str | torch.dtype | None = None, seed: int = 0,
                max_shard_bytes: int = 2 * 1024**3, force: bool = False, progress=None) -> SavedPreset:
    """Write random-weight preset ``name`` to ``output`` (safetensors shards of at most ``max_shard_bytes``,
    config, generation config, byte-level tokenizer), streamed and atomic (see the module docstring)."""
    from seqtool.arch.io import DTYPE_NAMES, atomic_output, resolve_dtype
    from seqtool.errors import BadInputError

    if not presets.is_preset(name) or name == "ref":
        names = [p for p in presets.preset_names() if p != "ref"]
        raise BadInputError(f"unknown preset '{name}' (ref is a shipped checkpoint, copy its directory); "
                            f"presets: {', '.join(names)}")
    started = time.perf_counter()
    torch_dtype = resolve_dtype(dtype) or presets.default_preset_dtype(name)
    config, plan = plan_preset(name, torch_dtype, seed=seed)
    config.dtype = torch_dtype
    with atomic_output(output, force=force, validate=validate_streamed) as tmp:
        files = write_streaming(tmp, plan, max_shard_bytes=max_shard_bytes, progress=progress)
        config.save_pretrained(tmp)
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        presets.byte_level_tokenizer().save_pretrained(tmp)
    return SavedPreset(name, str(Path(output).expanduser().resolve()), DTYPE_NAMES[torch_dtype], len(plan),
                       sum(p.info.nbytes for p in plan), len(files), round(time.perf_counter() - started, 3))
