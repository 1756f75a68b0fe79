"""Split-KV decode attention for a few queries over a long KV cache, with an optional page list."""
from __future__ import annotations

import torch

from seqtool.errors import ShapeError

from .._common import cdiv, check_int_tensor, check_per_batch, check_qkv, default_scale, forbid_grad, resolve_backend

__all__ = ["decode_attn"]


def decode_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, page_index: torch.Tensor | None = None,
    page_count: torch.Tensor | None = None, page_size: int = 64, scale: float | None = None,
    kv_start: torch.Tensor | None = None, kv_len: torch.Tensor | None = None, return_lse: bool = False,
    backend: str = "auto",
):
    """Attention of 1-16 trailing queries over a long KV cache, optionally restricted to selected pages.

    q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D). kv_len (B,) int: valid keys per row (default Tk); query i sits at
    position kv_len - Tq + i and sees keys kv_start <= t <= its position. page_index (B, Hkv, max_pages) int:
    pages (page p = keys [p*page_size, (p+1)*page_size)) shared by the query heads of a KV group, unique per
    row; page_count (B, Hkv) int entries used (default: all). Without page_index all keys are used.
    Returns out (B, Hq, Tq, D) in q.dtype and, if return_lse, lse (B, Hq, Tq) fp32 (-inf where no key).
    Forward only. backend: auto (triton split-KV on CUDA, torch otherwise), triton, torch, reference.
    """
    op = "decode_attn"
    B, Hq, Hkv, Tq, Tk, D = check_qkv(q, k, v, op)
    if Tq > Tk:
        raise ShapeError(f"{op}: more queries ({Tq}) than keys ({Tk}); use block_sparse_attn for prefill")
    if page_size < 1:
        raise ShapeError(f"{op}: page_size must be positive")
    if page_index is not None:
        page_index = check_int_tensor(page_index, "page_index", (B, Hkv), q.device, op, last_free=True)
        if page_count is None:
            page_count = torch.full((B, Hkv), page_index.shape[-1], dtype=torch.int32, device=q.device)
        page_count = check_int_tensor(page_count, "page_count", (B, Hkv), q.device, op)
        # value checks only on CPU: on CUDA they would sync every decode step (the kernel masks bad ids)
        used = torch.arange(page_index.shape[-1], device=q.device) < page_count[..., None]
        npg = cdiv(Tk, page_size)
        if q.device.type == "cpu" and bool(((page_index < 0) | (page_index >= npg))[used].any()):
            raise ShapeError(f"{op}: page_index holds ids outside [0, {cdiv(Tk, page_size)}) for {Tk} keys")
    elif page_count is not None:
        raise ShapeError(f"{op}: page_count given without page_index")
    kv_start = check_per_batch(kv_start, "kv_start", B, q.device, op)
    kv_len = check_per_batch(kv_len, "kv_len", B, q.device, op)
    if kv_len is not None and q.device.type == "cpu" and (kv_len.min() < Tq or kv_len.max() > Tk):
        raise ShapeError(f"{op}: kv_len must lie in [Tq={Tq}, Tk={Tk}]")
    forbid_grad(op, q, k, v)
    scale = default_scale(scale, D)
    backend = resolve_backend(backend, q.device, op)
    kw = dict(page_index=page_index, page_count=page_count, page_size=page_size, scale=scale, kv_start=kv_start,
              kv_len=kv_len)
    with torch.no_grad():
        if backend == "triton":
            from .triton_impl import decode_attn_triton

            out, lse = decode_attn_triton(q, k, v, **kw)
        elif backend == "reference":
            from .reference import decode_attn_reference

            out, lse = decode_attn_reference(q, k, v, **kw)
        else:
            from .torch_impl import decode_attn_torch

            out, lse = decode_attn_torch(q, k, v, **kw)
    return (out, lse) if return_lse else out
