"""The same training command on many processes: ``torchrun`` / ``accelerate launch`` environments.

:func:`init` reads the launcher's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``...) and
joins the process group (nccl on GPUs, gloo on CPU). :func:`wrap` shards every decoder layer and then the root
with FSDP2 (``torch.distributed.fsdp.fully_shard``), or wraps the model in DDP. Every rank keeps the full data
(the same rows); rank r takes its slice of each global micro-batch. :func:`full_state_dict` gathers the full
(unsharded) weights on CPU for rank 0 to save.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from seqtool.errors import BadInputError

DIST_MODES = ("fsdp", "ddp")


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: str | None = None  # None: one process

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True under torchrun / accelerate launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(mode: str = "fsdp", device: torch.device | None = None) -> DistInfo:
    """Join the process group the launcher set up (no-op for one process)."""
    if not launched():
        return DistInfo()
    if mode not in DIST_MODES:
        raise BadInputError(f"unknown --dist '{mode}'; use {' or '.join(DIST_MODES)}")
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = (device is None or device.type == "cuda") and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, mode)


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def wrap(model: nn.Module, info: DistInfo, layers: nn.ModuleList | None) -> nn.Module:
    """FSDP2 per decoder layer + root, or DDP; the model unchanged for one process."""
    if not info.enabled:
        return model
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        dev = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for layer in layers or []:
        fully_shard(layer)
    fully_shard(model)
    return model


def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average scalars over processes (a no-op for one)."""
    if not info.enabled or not values:
        return values
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return {k: float(v) / info.world for k, v in zip(keys, t.cpu().tolist())}


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def full_state_dict(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict; a collective under FSDP (every rank must call it)."""
    if info.mode == "fsdp" and info.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    inner = model.module if info.mode == "ddp" and info.enabled else model
    return {k: v.detach().cpu() for k, v in inner.state_dict().items()}


def unwrap(model: nn.Module, info: DistInfo) -> nn.Module:
    return model.module if info.enabled and info.mode == "ddp" else model


def shutdown() -> None:
    """Leave the process group if one was joined."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
