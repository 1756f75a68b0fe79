"""Tensor-by-tensor checkpoint I/O, for rewrites whose output is larger than memory (MoE upcycling).

:class:`TensorSource` reads one named tensor at a time, either from safetensors files (plain ``seek`` + ``read``,
no memory map, so the process holds only the tensors it asked for) or from an in-memory model's state dict.
:func:`write_streaming` writes safetensors shards whose tensors are computed one at a time by callbacks: each
shard's header is written from the planned shapes first, then every tensor is made, written and dropped.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

# safetensors dtype names <-> torch dtypes (the ones checkpoints of supported families use).
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
# Elementwise work on big tensors (means, finiteness checks) goes in chunks of this many elements, so temporaries
# (fp32 upcasts, masks) stay small next to the tensor itself.
CHUNK = 1 << 22


def chunked_mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Elementwise mean of same-shaped tensors, accumulated in fp32 one chunk at a time, in their dtype."""
    if len(tensors) == 1:
        return tensors[0]
    out = torch.empty_like(tensors[0])
    flat_out, flats = out.view(-1), [t.reshape(-1) for t in tensors]
    for start in range(0, flat_out.numel(), CHUNK):
        acc = sum(f[start:start + CHUNK].float() for f in flats)
        flat_out[start:start + CHUNK] = (acc / len(tensors)).to(out.dtype)
    return out


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN/inf, checked one chunk at a time."""
    if not tensor.is_floating_point():
        return True
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[s:s + CHUNK]).all()) for s in range(0, flat.numel(), CHUNK))


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class TensorSource:
    """Named tensors read one at a time: ``info(name)`` without reading, ``get(name)`` reads it."""

    def names(self) -> list[str]:
        raise NotImplementedError

    def info(self, name: str) -> TensorInfo:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError


def _read_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


class SafetensorsSource(TensorSource):
    """Every ``*.safetensors`` file of a checkpoint directory."""

    def __init__(self, directory: str | Path):
        self._where: dict[str, tuple[Path, int, dict]] = {}
        for path in sorted(Path(directory).glob("*.safetensors")):
            start, header = _read_header(path)
            for name, entry in header.items():
                self._where[name] = (path, start, entry)

    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> TensorInfo:
        _, _, entry = self._where[name]
        return TensorInfo(tuple(entry["shape"]), _ST_DTYPES[entry["dtype"]])

    def get(self, name: str) -> torch.Tensor:
        path, start, entry = self._where[name]
        begin, end = entry["data_offsets"]
        info = self.info(name)
        if end == begin:
            return torch.empty(info.shape, dtype=info.dtype)
        buffer = bytearray(end - begin)
        with open(path, "rb") as handle:
            handle.seek(start + begin)
            handle.readinto(buffer)
        return torch.frombuffer(buffer, dtype=torch.uint8).view(info.dtype).reshape(info.shape)


class StateDictSource(TensorSource):
    """An in-memory model's tensors (tied copies left out, as ``save_pretrained`` leaves them out)."""

    def __init__(self, state: dict[str, torch.Tensor], skip: tuple[str, ...] = ()):
        self._state = {k: v for k, v in state.items() if k not in skip}

    def names(self) -> list[str]:
        return list(self._state)

    def info(self, name: str) -> TensorInfo:
        t = self._state[name]
        return TensorInfo(tuple(t.shape), t.dtype)

    def get(self, name: str) -> torch.Tensor:
        return self._state[name].detach().cpu()


@dataclass
class PlannedTensor:
    """One output tensor: its name and shape/dtype, and the callback that computes it when its turn comes."""

    name: str
    info: TensorInfo
    make: Callable[[], torch.Tensor]


def _shards(plan: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for item in plan:
        if shards[-1] and size + item.info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.info.nbytes
    return shards


def write_streaming(directory: str | Path, plan: list[PlannedTensor], *, max_shard_bytes: int = 2 * 1024**3,
                    progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Write ``plan`` as safetensors shards (plus ``model.safetensors.index.json`` when there are several),
    computing one tensor at a time. A callback's tensor must match its planned shape and dtype."""
    directory = Path(directory)
    shards = _shards(plan, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, written, done = {}, [], 0
    for shard, file_name in zip(shards, names):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for item in shard:
            header[item.name] = {"dtype": _ST_NAMES[item.info.dtype], "shape": list(item.info.shape),
                                 "data_offsets": [offset, offset + item.info.nbytes]}
            offset += item.info.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        path = directory / file_name
        with open(path, "wb") as handle:
            handle.write(struct.pack("<Q", len(blob)))
            handle.write(blob)
            for item in shard:
                tensor = item.make()
                if tuple(tensor.shape) != item.info.shape or tensor.dtype != item.info.dtype:
                    raise ValueError(f"'{item.name}': made {tuple(tensor.shape)} {tensor.dtype}, "
                                     f"planned {item.info.shape} {item.info.dtype}")
                data = tensor.detach().contiguous().cpu().reshape(-1)
                if data.numel():
                    handle.write(memoryview(data.view(torch.uint8).numpy()))
                del tensor, data
                weight_map[item.name] = file_name
                done += 1
                if progress is not None:
                    progress(done, len(plan))
        written.append(path)
    if len(shards) > 1:
        total = sum(item.info.nbytes for item in plan)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return written


def validate_streamed(directory: str | Path, *, full_reload_max_bytes: int = 400_000_000) -> None:
    """Like :func:`seqtool.arch.io.validate_checkpoint`, one tensor in memory at a time: every tensor finite,
    the config loads, and a small checkpoint reloads with plain transformers with no weight missing or unused."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from seqtool.errors import SeqtoolError

    source = SafetensorsSource(directory)
    total = 0
    for name in source.names():
        tensor = source.get(name)
        if not all_finite(tensor):
            raise SeqtoolError(f"refusing to write a checkpoint with NaN/inf in '{name}'")
        total += tensor.numel() * tensor.element_size()
        del tensor
    AutoConfig.from_pretrained(directory, local_files_only=True)
    if total <= full_reload_max_bytes:
        _, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True, local_files_only=True)
        missing, unexpected = list(info.get("missing_keys", [])), list(info.get("unexpected_keys", []))
        if missing or unexpected:
            raise SeqtoolError(f"the written checkpoint does not match its class: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")
