"""Dense-mask reference for block-sparse attention (small shapes only: builds the Tq x Tk mask)."""
from __future__ import annotations

import torch


def sparse_token_mask(
    Tq: int, Tk: int, block_index: torch.Tensor, block_count: torch.Tensor, *, block_q: int, block_k: int,
    kv_start: torch.Tensor | None = None, column_index: torch.Tensor | None = None,
    column_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, H, Tq, Tk) bool: key t visible to query i (listed block or column, causal, t >= kv_start)."""
    B, H, nq, _ = block_index.shape
    nkb = -(-Tk // block_k)
    mask = torch.zeros(B, H, nq, nkb, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for j in range(nq):
                for s in range(int(block_count[b, h, j])):
                    mask[b, h, j, int(block_index[b, h, j, s])] = True
    tok = mask.repeat_interleave(block_q, dim=2)[:, :, :Tq].repeat_interleave(block_k, dim=3)[..., :Tk]
    if column_index is not None:
        cols = torch.zeros(B, H, nq, Tk, dtype=torch.bool)
        for b in range(B):
            for h in range(H):
                for j in range(nq):
                    for s in range(int(column_count[b, h, j])):
                        cols[b, h, j, int(column_index[b, h, j, s])] = True
        tok = tok | cols.repeat_interleave(block_q, dim=2)[:, :, :Tq]
    qpos = torch.arange(Tq) + (Tk - Tq)
    kpos = torch.arange(Tk)
    tok = tok & (kpos[None, :] <= qpos[:, None])
    if kv_start is not None:
        tok = tok & (kpos[None, None, None, :] >= kv_start.cpu().long()[:, None, None, None])
    return tok


def masked_attention_reference(q, k, v, mask, scale, shift=None, inv_freq=None):
    """Softmax attention of q (B,Hq,Tq,D) over k/v (B,Hkv,Tk,D) restricted to mask (B,Hq,Tq,Tk), in fp64.

    With ``shift`` (B,Hq,Tq,Tk) and ``inv_freq``, every (query, key) pair's key is first RoPE-moved by its
    shift (re-encoded positions). Rows with no visible key return out = 0, lse = -inf.
    Returns (out in q.dtype, lse fp32).
    """
    g = q.shape[1] // k.shape[1]
    qd, kd, vd = q.double().cpu(), k.double().cpu().repeat_interleave(g, 1), v.double().cpu().repeat_interleave(g, 1)
    if shift is None:
        s = (qd @ kd.transpose(-1, -2)) * scale
    else:
        from .._common import rope_rotate

        kq = rope_rotate(kd[:, :, None].expand(-1, -1, q.shape[2], -1, -1), shift, inv_freq.cpu())  # (B,H,Tq,Tk,D)
        s = torch.einsum("bhqd,bhqkd->bhqk", qd, kq) * scale
    s = s.masked_fill(~mask.cpu(), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    out = p @ vd
    return out.to(q.dtype).to(q.device), lse.float().to(q.device)


def block_sparse_attn_reference(q, k, v, block_index, block_count, *, block_q=64, block_k=64, scale=None,
                                kv_start=None, column_index=None, column_count=None, block_shift=None,
                                rope_inv_freq=None):
    """Obviously-right block_sparse_attn: build the token mask, run masked dense attention. Returns (out, lse)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = sparse_token_mask(q.shape[2], k.shape[2], block_index.cpu(), block_count.cpu(), block_q=block_q,
                             block_k=block_k, kv_start=kv_start,
                             column_index=None if column_index is None else column_index.cpu(),
                             column_count=None if column_count is None else column_count.cpu())
    shift = None if block_shift is None else token_shift(
        q.shape[2], k.shape[2], block_index.cpu(), block_count.cpu(), block_shift.cpu(), block_q=block_q,
        block_k=block_k)
    return masked_attention_reference(q, k, v, mask, scale, shift, rope_inv_freq)


def token_shift(Tq, Tk, block_index, block_count, block_shift, *, block_q, block_k) -> torch.Tensor:
    """(B, H, Tq, Tk) long: the position shift of key t as seen by query i (0 outside listed blocks)."""
    B, H, nq, _ = block_index.shape
    out = torch.zeros(B, H, Tq, Tk, dtype=torch.long)
    for b in range(B):
        for h in range(H):
            for j in range(nq):
                rows = slice(j * block_q, min((j + 1) * block_q, Tq))
                for s in range(int(block_count[b, h, j])):
                    blk = int(block_index[b, h, j, s])
                    out[b, h, rows, blk * block_k:min((blk + 1) * block_k, Tk)] = int(block_shift[b, h, j, s])
    return out


def vertical_slash_mask(Tq, Tk, vertical_index, slash_index, *, block_q, block_k, kv_start=None):
    """(B,H,Tq,Tk) bool for the vertical-slash pattern, straight from its definition.

    Key t is visible to query i (position p = Tk - Tq + i, query block J) iff t <= p, t >= kv_start and either
    t is a vertical column, or t's key block meets a slash line of some query in block J
    (slash offset o puts query p' on key p' - o).
    """
    B, H, _ = vertical_index.shape
    mask = torch.zeros(B, H, Tq, Tk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for J in range(-(-Tq // block_q)):
                rows = slice(J * block_q, min((J + 1) * block_q, Tq))
                first, last = Tk - Tq + rows.start, Tk - Tq + rows.stop - 1
                for o in slash_index[b, h].tolist():
                    if o < 0 or last - o < 0:
                        continue
                    # the line hits keys first-o .. last-o; mark every key block it touches
                    lo_blk, hi_blk = max(first - o, 0) // block_k, (last - o) // block_k
                    mask[b, h, rows, lo_blk * block_k:min((hi_blk + 1) * block_k, Tk)] = True
                for t in vertical_index[b, h].tolist():
                    if 0 <= t < Tk:
                        mask[b, h, rows, t] = True
    qpos = torch.arange(Tq) + (Tk - Tq)
    mask &= torch.arange(Tk)[None, :] <= qpos[:, None]
    if kv_start is not None:
        mask &= torch.arange(Tk)[None, None, None, :] >= kv_start.cpu().long()[:, None, None, None]
    return mask
