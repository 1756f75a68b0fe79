"""Shared validation and dispatch helpers for the kernel ops."""
from __future__ import annotations

import importlib.util
import math
import os

import torch

from seqtool.errors import NotImplementedMethodError, ShapeError

HAS_TRITON = importlib.util.find_spec("triton") is not None
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BACKENDS = ("auto", "triton", "torch", "reference")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def resolve_backend(backend: str, device: torch.device, op: str) -> str:
    """Pick ``triton`` on CUDA (when installed), ``torch`` elsewhere; validate explicit choices."""
    if backend not in BACKENDS:
        raise ShapeError(f"{op}: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and HAS_TRITON else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise NotImplementedMethodError(f"{op}: triton is not installed; use backend='torch'")
        if device.type != "cuda" and not interpreting():
            raise ShapeError(f"{op}: the triton backend needs CUDA tensors or TRITON_INTERPRET=1")
    return backend


def check_float_4d(op: str, **tensors: torch.Tensor) -> None:
    """Each tensor is a 4-D (B, H, T, D) float16/bfloat16/float32 tensor; all share one dtype and one device."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ShapeError(f"{op}: {name} must be a 4-D (B, H, T, D) tensor")
        if t.dtype not in FLOAT_DTYPES:
            raise ShapeError(f"{op}: {name} dtype {t.dtype} unsupported; use float16, bfloat16 or float32")
    names = ", ".join(tensors)
    if len({t.dtype for t in tensors.values()}) > 1:
        dtypes = ", ".join(str(t.dtype) for t in tensors.values())
        raise ShapeError(f"{op}: {names} dtypes differ ({dtypes}); cast them to one dtype")
    if len({t.device for t in tensors.values()}) > 1:
        raise ShapeError(f"{op}: {names} are on different devices; move them to one device")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, op: str, *, same_dv: bool = True):
    """Validate (B, Hq, Tq, D) / (B, Hkv, Tk, D) attention inputs; returns (B, Hq, Hkv, Tq, Tk, D)."""
    check_float_4d(op, q=q, k=k, v=v)
    B, Hq, Tq, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    if Bk != B or v.shape[0] != B:
        raise ShapeError(f"{op}: batch sizes differ (q {B}, k {Bk}, v {v.shape[0]})")
    if v.shape[1] != Hkv or v.shape[2] != Tk:
        raise ShapeError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} disagree on heads or length")
    if Dk != D or (same_dv and v.shape[3] != D):
        raise ShapeError(f"{op}: head dims differ (q {D}, k {Dk}, v {v.shape[3]})")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ShapeError(f"{op}: query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    return B, Hq, Hkv, Tq, Tk, D


def check_int_tensor(t: torch.Tensor, name: str, shape: tuple, device: torch.device, op: str,
                     *, last_free: bool = False) -> torch.Tensor:
    """Validate an integer index tensor's shape/device; returns it as contiguous int32."""
    if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ShapeError(f"{op}: {name} must be an integer tensor")
    want = tuple(shape)
    got = tuple(t.shape[:-1]) if last_free else tuple(t.shape)
    if got != want or (last_free and t.dim() != len(want) + 1):
        full = want + (("N",) if last_free else ())
        raise ShapeError(f"{op}: {name} has shape {tuple(t.shape)}, expected {full}")
    if t.device != device:
        raise ShapeError(f"{op}: {name} is on {t.device} but q is on {device}")
    return t.to(torch.int32).contiguous()


def check_per_batch(t: torch.Tensor | None, name: str, B: int, device: torch.device, op: str):
    if t is None:
        return None
    return check_int_tensor(t, name, (B,), device, op)


def default_scale(scale: float | None, D: int) -> float:
    return 1.0 / math.sqrt(D) if scale is None else float(scale)


def forbid_grad(op: str, *tensors: torch.Tensor | None) -> None:
    """Forward-only ops refuse tensors that need gradients instead of silently detaching them."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise NotImplementedMethodError(
            f"{op} has no backward pass; call it under torch.no_grad() or torch.inference_mode()"
        )



def rope_rotate(x: torch.Tensor, shift: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move RoPE-encoded vectors ``x`` (..., D) by ``shift`` positions (broadcast to x.shape[:-1]).

    RoPE (rotate-half layout, as transformers applies it) rotates dim pairs (i, i + R/2) of the first
    R = 2 * len(inv_freq) dims by position * inv_freq; rotations compose, so rotating an encoded key by
    ``shift * inv_freq`` re-encodes it at position + shift. Dims past R (partial rotary) are left alone.
    Returns a new tensor in x's dtype (angles in fp64, so large shifts stay exact).
    """
    half = inv_freq.numel()
    ang = shift.to(torch.float64)[..., None] * inv_freq.to(device=x.device, dtype=torch.float64)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:2 * half]
    out = x.clone()
    out[..., :half] = x1 * cos - x2 * sin
    out[..., half:2 * half] = x2 * cos + x1 * sin
    return out


class Workspace:
    """Reused flat buffers: on CPU a fresh multi-MB allocation page-faults on every step and costs more than
    the math. ``get`` returns a view of at least the requested size, valid until the next ``get`` of the name."""

    def __init__(self, device):
        self.device, self.bufs = device, {}

    def get(self, name: str, shape: tuple, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = math.prod(shape)
        buf = self.bufs.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = self.bufs[(name, dtype)] = torch.empty(n, dtype=dtype, device=self.device)
        return buf[:n].view(shape)
