"""Vectorised PyTorch block-sparse attention: touches only the listed key blocks and columns.

Query blocks of every (batch, head) are flattened into rows and grouped by how many key blocks they keep
(at most max(block_count) distinct values). Each group gathers its rows' key blocks into one
(rows, count * block_k, D) tensor and runs an exact softmax with two batched matmuls, so the work is
proportional to the kept blocks, the Python loop runs over groups (never over query blocks), and no
Tq x Tk tensor exists: temporaries are capped at about _CHUNK_ELEMS elements per step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import cdiv


_CHUNK_ELEMS = 1 << 21  # per-step gathered keys (8 MB fp32): small enough to stay in cache


def _pad_rows(x: torch.Tensor, T: int) -> torch.Tensor:
    """fp32 copy-free view when possible; zero rows appended along dim 2 up to T."""
    x = x.float()
    return x if x.shape[2] == T else F.pad(x, (0, 0, 0, T - x.shape[2]))


class _Workspace:
    """Reused flat buffers: fresh large allocations page-fault on every step and cost more than the math."""

    def __init__(self, device):
        self.device, self.bufs = device, {}

    def get(self, name: str, shape: tuple) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < n:
            buf = self.bufs[name] = torch.empty(n, device=self.device)
        return buf[:n].view(shape)


def _attend(ws, src_q, q_ids, src_k, src_v, kv_ids, L, ok_fn):
    """Exact softmax of rows src_q[q_ids] (n, bq, D) (already scaled) over keys gathered by kv_ids.

    kv_ids index dim 0 of src_k / src_v; gathered keys are viewed as (n, L, D).
    ok_fn(scores (n, bq, L)) masks in place. Returns (unnormalised out, denominator l, max m).
    """
    n, bq, D = q_ids.numel(), src_q.shape[1], src_q.shape[-1]
    qb = torch.index_select(src_q, 0, q_ids, out=ws.get("q", (n, bq, D)))
    kg = torch.index_select(src_k, 0, kv_ids, out=ws.get("k", (kv_ids.numel(),) + tuple(src_k.shape[1:])))
    vg = torch.index_select(src_v, 0, kv_ids, out=ws.get("v", (kv_ids.numel(),) + tuple(src_v.shape[1:])))
    kg, vg = kg.view(n, L, D), vg.view(n, L, D)
    sc = torch.bmm(qb, kg.transpose(1, 2), out=ws.get("s", (n, bq, L)))
    ok_fn(sc)
    m = sc.amax(-1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    sc.sub_(m[..., None]).exp_()
    return torch.bmm(sc, vg), sc.sum(-1), m


def _store(out_rows, lse_rows, rows, o, l, m):
    seen = l > 0
    l1 = torch.where(seen, l, torch.ones_like(l))
    out_rows.index_copy_(0, rows, o / l1[..., None])
    lse_rows.index_copy_(0, rows, torch.where(seen, m + torch.log(l1), torch.full_like(m, float("-inf"))))


def block_sparse_attn_torch(q, k, v, block_index, block_count, *, block_q, block_k, scale, kv_start=None,
                            column_index=None, column_count=None):
    """Same contract as block_sparse_attn (inputs already validated). Returns (out, lse fp32)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    bq, bk = block_q, block_k
    nq, nkb = cdiv(Tq, bq), cdiv(Tk, bk)
    R = B * Hq * nq
    dev = q.device
    off = Tk - Tq  # queries sit at the end of the keys

    # fp32 compute; q is pre-scaled (one pass over q instead of one per score).
    qr = (_pad_rows(q, nq * bq) * scale).reshape(R, bq, D)
    kf = _pad_rows(k, nkb * bk).reshape(B * Hkv * nkb, bk, D)
    vf = _pad_rows(v, nkb * bk).reshape(B * Hkv * nkb, bk, D)

    row = torch.arange(R, device=dev)
    row_b = row // (Hq * nq)
    row_kvh = row_b * Hkv + (row // nq) % Hq // g
    row_q0 = off + (row % nq) * bq  # position of the first query of the row's block
    kvs = torch.zeros(B, dtype=torch.long, device=dev) if kv_start is None else kv_start.long()
    row_kvs = kvs[row_b]
    ar_q = torch.arange(bq, device=dev)
    ar_k = torch.arange(bk, device=dev)

    ws = _Workspace(dev)
    out_rows = torch.zeros(R, bq, D, device=dev)
    lse_rows = torch.full((R, bq), float("-inf"), device=dev)
    maxk = block_index.shape[-1]
    counts = block_count.reshape(R).long().clamp(0, maxk)
    order = torch.argsort(counts, descending=True, stable=True)
    values, sizes = torch.unique_consecutive(counts[order], return_counts=True)
    start = 0
    for c, size in zip(values.tolist(), sizes.tolist()):
        seg = order[start:start + size]
        start += size
        if c == 0:
            continue
        step = max(1, _CHUNK_ELEMS // (c * bk * D))  # rows per step
        for r0 in range(0, size, step):
            rows = seg[r0:r0 + step]
            n = rows.numel()
            blk = block_index.reshape(R, maxk)[rows, :c].long()
            ids = (row_kvh[rows, None] * nkb + blk).reshape(-1)
            k0 = blk * bk
            q0, rk = row_q0[rows, None], row_kvs[rows, None]
            # Only blocks crossing the diagonal, the end of k, or kv_start need a mask.
            need_r, need_s = ((k0 + bk - 1 > q0) | (k0 + bk > Tk) | (k0 < rk)).nonzero(as_tuple=True)

            def mask_blocks(sc, need_r=need_r, need_s=need_s, k0=k0, rows=rows, n=n, c=c):
                if need_r.numel() == 0:
                    return
                sc4 = sc.view(n, bq, c, bk)
                kpos = k0[need_r, need_s, None] + ar_k
                qpos = row_q0[rows][need_r, None] + ar_q
                ok = (kpos[:, None, :] <= qpos[:, :, None]) & (kpos < Tk)[:, None, :] \
                    & (kpos >= row_kvs[rows][need_r, None])[:, None, :]
                sc4[need_r, :, need_s, :] = sc4[need_r, :, need_s, :].masked_fill(~ok, float("-inf"))

            o, l, m = _attend(ws, qr, rows, kf, vf, ids, c * bk, mask_blocks)
            _store(out_rows, lse_rows, rows, o, l, m)

    if column_index is not None:
        from ..merge import merge_attn_states

        col = _columns(qr, k, v, column_index, column_count, row_kvh, row_q0, row_kvs, Tk)
        if col is not None:
            rows, o_c, lse_c = col
            o_m, lse_m = merge_attn_states(out_rows[rows], lse_rows[rows], o_c, lse_c)
            out_rows.index_copy_(0, rows, o_m)
            lse_rows.index_copy_(0, rows, lse_m)

    out = out_rows.reshape(B, Hq, nq * bq, D)[:, :, :Tq].to(q.dtype)
    lse = lse_rows.reshape(B, Hq, nq * bq)[:, :, :Tq]
    return out.contiguous(), lse.contiguous()


def _columns(qr, k, v, column_index, column_count, row_kvh, row_q0, row_kvs, Tk):
    """Attention of every row over its explicit key columns alone: (rows, out, lse) or None if none."""
    R, bq, D = qr.shape
    maxcol = column_index.shape[-1]
    ccount = column_count.reshape(R).long().clamp(0, maxcol)
    rows_all = (ccount > 0).nonzero().squeeze(1)
    if rows_all.numel() == 0:
        return None
    kflat = k.float().reshape(-1, D)
    vflat = v.float().reshape(-1, D)
    out = torch.zeros(R, bq, D, device=qr.device)
    lse = torch.full((R, bq), float("-inf"), device=qr.device)
    ws = _Workspace(qr.device)
    width = int(ccount.max())
    step = max(1, _CHUNK_ELEMS // (width * D))
    for r0 in range(0, rows_all.numel(), step):
        rows = rows_all[r0:r0 + step]
        cols = column_index.reshape(R, maxcol)[rows, :width].long()
        valid = (torch.arange(width, device=qr.device) < ccount[rows, None]) \
            & (cols >= row_kvs[rows, None]) & (cols < Tk)
        flat = (row_kvh[rows, None] * Tk + cols.clamp(0, Tk - 1)).reshape(-1)
        qpos = row_q0[rows, None] + torch.arange(bq, device=qr.device)
        ok = valid[:, None, :] & (cols[:, None, :] <= qpos[:, :, None])
        o, l, m = _attend(ws, qr, rows, kflat, vflat, flat, width,
                          lambda sc, ok=ok: sc.masked_fill_(~ok, float("-inf")))
        _store(out, lse, rows, o, l, m)
    return rows_all, out[rows_all], lse[rows_all]
