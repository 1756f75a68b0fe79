"""Streamed checkpoint writing: shards, index, and a reader that returns exactly what was written."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from seqtool.arch.stream import PlannedTensor, SafetensorsSource, TensorInfo, write_streaming


def test_streamed_shards_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": torch.randn(5, 7 + i, generator=gen).to(dtype)
               for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16, torch.float32])}
    made = []
    plan = [PlannedTensor(n, TensorInfo(tuple(t.shape), t.dtype), lambda n=n, t=t: made.append(n) or t)
            for n, t in tensors.items()]
    files = write_streaming(tmp_path, plan, max_shard_bytes=200)
    assert len(files) > 1 and made == list(tensors)  # computed one at a time, in order
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    source = SafetensorsSource(tmp_path)
    for name, t in tensors.items():
        assert torch.equal(source.get(name), t)
        assert torch.equal(load_file(tmp_path / index["weight_map"][name])[name], t)
