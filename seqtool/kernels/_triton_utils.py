"""Triton launch helpers (imported only when a Triton kernel is launched)."""
from __future__ import annotations

import torch

from seqtool.errors import ShapeError

from ._common import interpreting


def dot_fp32() -> bool:
    """bf16 tl.dot is wrong in the interpreter, so interpreted kernels upcast operands first."""
    return interpreting()


def pow2_at_least(n: int, lo: int = 16) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


def check_block(value: int, name: str, op: str) -> None:
    if value < 16 or value & (value - 1):
        raise ShapeError(f"{op}: the triton backend needs {name} to be a power of two >= 16 (got {value})")


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
