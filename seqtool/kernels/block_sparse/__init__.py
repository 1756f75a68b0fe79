"""Block-sparse causal attention (BSR key-block lists, optional explicit key columns, vertical-slash)."""
from __future__ import annotations

import torch

from seqtool.errors import ShapeError

from .._common import cdiv, check_int_tensor, check_per_batch, check_qkv, default_scale, forbid_grad, resolve_backend
from .vertical_slash import vertical_slash_index

__all__ = ["block_sparse_attn", "vertical_slash_attn", "vertical_slash_index"]


def block_sparse_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: torch.Tensor, block_count: torch.Tensor, *,
    block_q: int = 64, block_k: int = 64, scale: float | None = None, kv_start: torch.Tensor | None = None,
    return_lse: bool = False, column_index: torch.Tensor | None = None,
    column_count: torch.Tensor | None = None, block_shift: torch.Tensor | None = None,
    rope_inv_freq: torch.Tensor | None = None, backend: str = "auto",
):
    """Causal attention of each query block over its listed key blocks (and optional extra key columns).

    q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D), Hq % Hkv == 0; query i sits at key position Tk - Tq + i.
    block_index (B, Hq, ceil(Tq/block_q), max_k_blocks) int: key-block ids (block b = keys
    [b*block_k, (b+1)*block_k)), unique per row, any order; entries past block_count are ignored.
    block_count (B, Hq, ceil(Tq/block_q)) int. column_index (B, Hq, n_qblocks, max_cols) int: absolute key
    positions attended in addition (must not fall inside listed blocks), with column_count like block_count.
    kv_start (B,) int: keys before it are ignored. Causal masking applies inside blocks.
    block_shift (B, Hq, n_qblocks, max_k_blocks) int with rope_inv_freq (R/2,): RoPE position re-encoding, the
    keys of each listed block are moved by that many positions for that query block (LongHeads); causality
    still follows the original positions. Computed by the torch path on every device (the Triton kernel
    has no re-encoding).
    Returns out (B, Hq, Tq, D) in q.dtype, plus lse (B, Hq, Tq) fp32 if return_lse; rows that see no key
    give out 0 and lse -inf. Forward only. backend: auto (triton on CUDA, torch otherwise), triton, torch.
    """
    op = "block_sparse_attn"
    B, Hq, Hkv, Tq, Tk, D = check_qkv(q, k, v, op)
    if Tq > Tk:
        raise ShapeError(f"{op}: more queries ({Tq}) than keys ({Tk}); queries are aligned to the end of the keys")
    if block_q < 1 or block_k < 1:
        raise ShapeError(f"{op}: block_q and block_k must be positive")
    nq = cdiv(Tq, block_q)
    block_index = check_int_tensor(block_index, "block_index", (B, Hq, nq), q.device, op, last_free=True)
    block_count = check_int_tensor(block_count, "block_count", (B, Hq, nq), q.device, op)
    if (column_index is None) != (column_count is None):
        raise ShapeError(f"{op}: pass column_index and column_count together")
    if column_index is not None:
        column_index = check_int_tensor(column_index, "column_index", (B, Hq, nq), q.device, op, last_free=True)
        column_count = check_int_tensor(column_count, "column_count", (B, Hq, nq), q.device, op)
    if (block_shift is None) != (rope_inv_freq is None):
        raise ShapeError(f"{op}: pass block_shift and rope_inv_freq together")
    if block_shift is not None:
        block_shift = check_int_tensor(block_shift, "block_shift", (B, Hq, nq), q.device, op, last_free=True)
        if block_shift.shape != block_index.shape:
            raise ShapeError(f"{op}: block_shift {tuple(block_shift.shape)} must match block_index "
                             f"{tuple(block_index.shape)}")
        if rope_inv_freq.dim() != 1 or 2 * rope_inv_freq.numel() > D:
            raise ShapeError(f"{op}: rope_inv_freq must be 1-D with at most D/2 = {D // 2} frequencies")
    kv_start = check_per_batch(kv_start, "kv_start", B, q.device, op)
    if q.device.type == "cpu":  # on CUDA this would cost a sync per call; the kernel masks bad ids instead
        _check_ids(block_index, block_count, cdiv(Tk, block_k), "block_index", op)
        if column_index is not None:
            _check_ids(column_index, column_count, Tk, "column_index", op)
    forbid_grad(op, q, k, v)
    scale = default_scale(scale, D)
    backend = resolve_backend(backend, q.device, op)
    kw = dict(block_q=block_q, block_k=block_k, scale=scale, kv_start=kv_start, column_index=column_index,
              column_count=column_count)
    if block_shift is not None:
        kw.update(block_shift=block_shift, rope_inv_freq=rope_inv_freq)
        backend = "torch" if backend == "triton" else backend
    with torch.no_grad():
        if backend == "triton":
            from .triton_impl import block_sparse_attn_triton

            out, lse = block_sparse_attn_triton(q, k, v, block_index, block_count, **kw)
        elif backend == "reference":
            from .reference import block_sparse_attn_reference

            out, lse = block_sparse_attn_reference(q, k, v, block_index, block_count, **kw)
        else:
            from .torch_impl import block_sparse_attn_torch

            out, lse = block_sparse_attn_torch(q, k, v, block_index, block_count, **kw)
    return (out, lse) if return_lse else out


def _check_ids(index: torch.Tensor, count: torch.Tensor, limit: int, name: str, op: str) -> None:
    used = torch.arange(index.shape[-1], device=index.device) < count[..., None]
    if bool(((index < 0) | (index >= limit))[used].any()):
        raise ShapeError(f"{op}: {name} holds ids outside [0, {limit}) among its first block_count entries")


def vertical_slash_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, vertical_index: torch.Tensor, slash_index: torch.Tensor, *,
    vertical_count: torch.Tensor | None = None, slash_count: torch.Tensor | None = None, block_q: int = 64,
    block_k: int = 64, scale: float | None = None, kv_start: torch.Tensor | None = None,
    return_lse: bool = False, backend: str = "auto",
):
    """MInference vertical-slash attention: vertical_index (B, Hq, NV) absolute key columns, slash_index
    (B, Hq, NS) diagonal offsets (>= 0). Converted by vertical_slash_index (slashes cover whole key blocks,
    verticals exact columns) and run by block_sparse_attn; same q/k/v/kv_start/return semantics.
    """
    op = "vertical_slash_attn"
    B, Hq, _, Tq, Tk, _ = check_qkv(q, k, v, op)
    for name, t in (("vertical_index", vertical_index), ("slash_index", slash_index)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or tuple(t.shape[:2]) != (B, Hq):
            raise ShapeError(f"{op}: {name} must be (B, Hq, N) = ({B}, {Hq}, N)")
    bi, bc, ci, cc = vertical_slash_index(vertical_index, slash_index, Tq, Tk, block_q=block_q, block_k=block_k,
                                          vertical_count=vertical_count, slash_count=slash_count)
    return block_sparse_attn(q, k, v, bi, bc, block_q=block_q, block_k=block_k, scale=scale, kv_start=kv_start,
                             return_lse=return_lse, column_index=ci, column_count=cc, backend=backend)
