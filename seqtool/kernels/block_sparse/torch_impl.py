"""Vectorised PyTorch block-sparse attention: touches only the listed key blocks and columns.

Query blocks of every (batch, head) are flattened into rows and grouped by how many key blocks they keep
(at most max(block_count) distinct values). Each group gathers its rows' key blocks into one
(rows, count * block_k, D) tensor and runs an exact softmax with two batched matmuls, so the work is
proportional to the kept blocks, the Python loop runs over groups (never over query blocks), and no
Tq x Tk tensor exists: temporaries are capped at about _CHUNK_ELEMS elements per step.

Fast path (prefill, the common case): a row whose blocks are all fully visible except one diagonal block
aligned with the query block gets that block moved last, so its causal mask is one constant (bq, bk)
triangle added in place; any other row (kv_start, partial or misaligned blocks) takes the general masked path.
Explicit key columns lying before their query block (vertical-slash) need only a per-row padding mask;
rows are grouped by column count rounded up to _COL_BUCKET, and merged with the block part by log-sum-exp.
"""
from __future__ import annotations

import torch

from .._common import Workspace, cdiv, rope_rotate
from ..merge import merge_attn_states


_CHUNK_ELEMS = 1 << 19  # per-step gathered keys (2 MB fp32), one thread: scores of a step stay in L2
# With several threads every large op is a parallel region ending in a barrier; on a loaded machine a
# barrier waits for the slowest thread, so fewer, larger steps win (each thread's share stays moderate).
_CHUNK_ELEMS_THREADED = 1 << 22


def _chunk_elems() -> int:
    return _CHUNK_ELEMS if torch.get_num_threads() == 1 else _CHUNK_ELEMS_THREADED
_COL_BUCKET = 16  # column groups: counts rounded up to this (padding is masked, at most 15 slots per row)
_NEG = float("-inf")


def _groups(key: torch.Tensor):
    """Yield (key value, row ids) per distinct value of ``key`` (R,), largest value first."""
    order = torch.argsort(key, descending=True, stable=True)
    values, sizes = torch.unique_consecutive(key[order], return_counts=True)
    start = 0
    for value, size in zip(values.tolist(), sizes.tolist()):
        yield value, order[start:start + size]
        start += size


def _rows_fp32(x: torch.Tensor, T: int, scale: float | None = None) -> torch.Tensor:
    """(B, H, t, D) -> contiguous fp32 (B, H, T, D), zero rows appended, times scale; no copy when possible."""
    if scale is None and x.dtype == torch.float32 and x.shape[2] == T and x.is_contiguous():
        return x
    B, H, t, D = x.shape
    out = torch.empty(B, H, T, D, device=x.device)
    if scale is None:
        out[:, :, :t].copy_(x)
    else:
        torch.mul(x.float(), scale, out=out[:, :, :t])  # scale in fp32, not in x's dtype
    if T > t:
        out[:, :, t:].zero_()
    return out


def _gather_kv(ws, kf2, vf2, ids, n, L, D):
    """Rows `ids` of the 2-D (N, row) views kf2 / vf2 as (n, L, D) (2-D index_select is the fast copy)."""
    kg = torch.index_select(kf2, 0, ids, out=ws.get("k", (ids.numel(), kf2.shape[1])))
    vg = torch.index_select(vf2, 0, ids, out=ws.get("v", (ids.numel(), vf2.shape[1])))
    return kg.view(n, L, D), vg.view(n, L, D)


def _softmax_av(ws, qb, kg, vg, bias_fn=None):
    """Scores qb @ kg^T (n, bq, L), bias_fn(scores) in place, exact softmax times vg.

    Returns (unnormalised out (n, bq, D), denominator l (n, bq), row max m (n, bq)); m is 0 where a row sees
    no key (then l == 0).
    """
    n, bq, L = qb.shape[0], qb.shape[1], kg.shape[1]
    sc = torch.bmm(qb, kg.transpose(1, 2), out=ws.get("s", (n, bq, L)))
    if bias_fn is not None:
        bias_fn(sc)
    m = sc.amax(-1)
    if bias_fn is not None:
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    sc.sub_(m[..., None]).exp_()
    return torch.bmm(sc, vg), sc.sum(-1), m


def _normalise(o, l, m):
    """Unnormalised partial (o (n, bq, D), l, m) -> (out, lse); rows that saw no key give 0 / -inf."""
    seen = l > 0
    l1 = torch.where(seen, l, torch.ones_like(l))
    return o.div_(l1[..., None]), torch.where(seen, m + torch.log(l1), torch.full_like(m, _NEG))


def _store(out_rows, lse_rows, rows, o, l, m):
    out, lse = _normalise(o, l, m)
    out_rows.index_copy_(0, rows, out)
    lse_rows.index_copy_(0, rows, lse)


def _merge_store(out_rows, lse_rows, rows, o, l, m):
    """Merge a partial result (o, l, m) over extra keys into rows already holding (out, lse)."""
    out, lse = merge_attn_states(out_rows.index_select(0, rows), lse_rows.index_select(0, rows), *_normalise(o, l, m))
    out_rows.index_copy_(0, rows, out)
    lse_rows.index_copy_(0, rows, lse)


def block_sparse_attn_torch(q, k, v, block_index, block_count, *, block_q, block_k, scale, kv_start=None,
                            column_index=None, column_count=None, block_shift=None, rope_inv_freq=None):
    """Same contract as block_sparse_attn (inputs already validated). Returns (out, lse fp32).

    With ``block_shift``, each gathered key block is RoPE-rotated by its shift for that query block.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    bq, bk = block_q, block_k
    nq, nkb = cdiv(Tq, bq), cdiv(Tk, bk)
    R = B * Hq * nq
    dev = q.device
    off = Tk - Tq  # queries sit at the end of the keys

    # fp32 compute; q is pre-scaled (one pass over q instead of one per score).
    qr = _rows_fp32(q, nq * bq, scale).view(R, bq, D)
    kb = _rows_fp32(k, nkb * bk)
    vb = _rows_fp32(v, nkb * bk)
    kf2, vf2 = kb.view(B * Hkv * nkb, bk * D), vb.view(B * Hkv * nkb, bk * D)

    row = torch.arange(R, device=dev)
    row_b = row // (Hq * nq)
    row_kvh = row_b * Hkv + (row // nq) % Hq // g
    row_q0 = off + (row % nq) * bq  # position of the first query of the row's block
    kvs = torch.zeros(B, dtype=torch.long, device=dev) if kv_start is None else kv_start.long()
    row_kvs = kvs[row_b]

    ws = Workspace(dev)
    chunk = _chunk_elems()
    out_rows = torch.zeros(R, bq, D, device=dev)
    lse_rows = torch.full((R, bq), _NEG, device=dev)
    maxk = block_index.shape[-1]
    counts = block_count.reshape(R).long().clamp(0, maxk)
    blk = block_index.reshape(R, maxk).long()
    used = torch.arange(maxk, device=dev) < counts[:, None]
    k0 = blk * bk
    q0, rk = row_q0[:, None], row_kvs[:, None]
    # Blocks crossing the diagonal, the end of k, or kv_start need a mask.
    need = used & ((k0 + bk - 1 > q0) | (k0 + bk > Tk) | (k0 < rk))
    n_need = need.sum(1)
    # An aligned diagonal block (keys k0.. == queries q0..) needs only the triangle j <= i: keys past Tk are
    # beyond every real query of the block, so causality already hides them.
    diag = need & (k0 == q0) & (k0 >= rk) if bq == bk else torch.zeros_like(need)
    fast = (n_need == 0) | ((n_need == 1) & (diag.sum(1) == 1))
    # fast rows: fully visible blocks first, the diagonal last, unused slots after
    perm = torch.argsort((~used).long() * 2 + need.long(), dim=1, stable=True)
    blk_fast = blk.gather(1, perm)
    shift = shift_fast = None
    if block_shift is not None:
        shift = block_shift.reshape(R, maxk).long()
        shift_fast = shift.gather(1, perm)
        inv_freq = rope_inv_freq.to(dev)
    tri = torch.full((bq, bk), _NEG, device=dev).triu_(1)

    key = torch.where(fast, counts * 2 + (n_need > 0).long(), -1 - counts)  # general rows: key < 0
    for kv_key, seg in _groups(key):
        size = seg.numel()
        c = kv_key // 2 if kv_key >= 0 else -1 - kv_key
        if c == 0:
            continue
        step = max(1, chunk // (c * bk * D))  # rows per step
        for r0 in range(0, size, step):
            rows = seg[r0:r0 + step]
            n = rows.numel()
            qb = torch.index_select(qr, 0, rows, out=ws.get("q", (n, bq, D)))
            if kv_key >= 0:
                ids = (row_kvh[rows, None] * nkb + blk_fast[rows, :c]).reshape(-1)
                kg, vg = _gather_kv(ws, kf2, vf2, ids, n, c * bk, D)
                if shift is not None:
                    kg = _shift_keys(kg, shift_fast[rows, :c], inv_freq)
                bias = (lambda sc: sc[:, :, -bk:].add_(tri)) if kv_key % 2 else None
                _store(out_rows, lse_rows, rows, *_softmax_av(ws, qb, kg, vg, bias))
            else:
                bl = blk[rows, :c]
                ids = (row_kvh[rows, None] * nkb + bl).reshape(-1)
                kg, vg = _gather_kv(ws, kf2, vf2, ids, n, c * bk, D)
                if shift is not None:
                    kg = _shift_keys(kg, shift[rows, :c], inv_freq)
                o, l, m = _softmax_av(ws, qb, kg, vg, _block_mask(bl * bk, row_q0[rows], row_kvs[rows], n, bq, bk,
                                                                  c, Tk))
                _store(out_rows, lse_rows, rows, o, l, m)

    if column_index is not None:
        _columns(ws, qr, kb, vb, column_index, column_count, row_kvh, row_q0, row_kvs, Tk, out_rows, lse_rows)

    out = out_rows.view(B, Hq, nq * bq, D)[:, :, :Tq].to(q.dtype)
    lse = lse_rows.view(B, Hq, nq * bq)[:, :, :Tq]
    return out.contiguous(), lse.contiguous()


def _shift_keys(kg, shift, inv_freq):
    """Gathered keys (n, c*bk, D) RoPE-rotated by shift (n, c) per block; untouched when every shift is 0."""
    if not bool(shift.any()):
        return kg
    n, L, D = kg.shape
    c = shift.shape[1]
    return rope_rotate(kg.view(n, c, L // c, D), shift[:, :, None], inv_freq).view(n, L, D)


def _block_mask(k0, q0, kvs, n, bq, bk, c, Tk):
    """In-place -inf on the scores (n, bq, c*bk) of keys that are non-causal, past Tk or before kv_start."""
    ar_q, ar_k = torch.arange(bq, device=k0.device), torch.arange(bk, device=k0.device)
    need_r, need_s = ((k0 + bk - 1 > q0[:, None]) | (k0 + bk > Tk) | (k0 < kvs[:, None])).nonzero(as_tuple=True)

    def apply(sc):
        if need_r.numel() == 0:
            return
        sc4 = sc.view(n, bq, c, bk)
        kpos = k0[need_r, need_s, None] + ar_k
        qpos = q0[need_r, None] + ar_q
        ok = (kpos[:, None, :] <= qpos[:, :, None]) & (kpos < Tk)[:, None, :] & (kpos >= kvs[need_r, None])[:, None, :]
        sc4[need_r, :, need_s, :] = sc4[need_r, :, need_s, :].masked_fill(~ok, _NEG)

    return apply


def _columns(ws, qr, kb, vb, column_index, column_count, row_kvh, row_q0, row_kvs, Tk, out_rows, lse_rows):
    """Add every row's explicit key columns to its block result (merged by log-sum-exp), in place.

    kb / vb: contiguous fp32 (B, Hkv, Tkp, D) keys / values, Tkp >= Tk (zero rows past Tk).

    Rows whose columns all lie at or before their first query (vertical-slash: columns avoid the diagonal
    block) need only a padding mask; other rows also get the causal and kv_start masks.
    """
    R, bq, D = qr.shape
    dev = qr.device
    maxcol = column_index.shape[-1]
    ccount = column_count.reshape(R).long().clamp(0, maxcol)
    if not bool((ccount > 0).any()):
        return
    Tkp = kb.shape[2]
    kf2, vf2 = kb.view(-1, D), vb.view(-1, D)
    cols_all = column_index.reshape(R, maxcol).long()
    slot = torch.arange(maxcol, device=dev)
    used = slot < ccount[:, None]
    bad = used & ((cols_all > row_q0[:, None]) | (cols_all < row_kvs[:, None]) | (cols_all >= Tk))
    simple = ~bad.any(1)
    width = (ccount + _COL_BUCKET - 1) // _COL_BUCKET * _COL_BUCKET
    key = torch.where(ccount > 0, width * 2 + (~simple).long(), 0)
    for gkey, seg in _groups(key):
        size = seg.numel()
        W, masked = min(gkey // 2, maxcol), gkey % 2
        if W == 0:
            continue
        step = max(1, _chunk_elems() // (W * D))
        for r0 in range(0, size, step):
            rows = seg[r0:r0 + step]
            n = rows.numel()
            cols = cols_all[rows, :W]
            ok = used[rows, :W]
            flat = (row_kvh[rows, None] * Tkp + torch.where(ok, cols, 0).clamp(0, Tk - 1)).reshape(-1)
            kg, vg = _gather_kv(ws, kf2, vf2, flat, n, W, D)
            qb = torch.index_select(qr, 0, rows, out=ws.get("q", (n, bq, D)))
            if masked:
                qpos = row_q0[rows, None] + torch.arange(bq, device=dev)
                vis = (ok & (cols >= row_kvs[rows, None]) & (cols < Tk))[:, None, :] & (cols[:, None, :] <= qpos[:, :, None])
                bias = lambda sc, vis=vis: sc.masked_fill_(~vis, _NEG)  # noqa: E731
            else:
                pad = torch.zeros(n, 1, W, device=dev).masked_fill_(~ok[:, None, :], _NEG)
                bias = (lambda sc, pad=pad: sc.add_(pad)) if not bool(ok.all()) else None
            o, l, m = _softmax_av(ws, qb, kg, vg, bias)
            _merge_store(out_rows, lse_rows, rows, o, l, m)
