"""PyTorch decode attention: query heads of a KV group attend together; only selected pages are gathered."""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from .._common import Workspace, cdiv


def decode_attn_torch(q, k, v, *, page_index=None, page_count=None, page_size=64, scale, kv_start=None,
                      kv_len=None):
    """Same contract as decode_attn (inputs validated). Returns (out (B,Hq,Tq,D), lse (B,Hq,Tq) fp32)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    dev = q.device
    # (B, Hkv, g*Tq, D): one matmul per KV head serves all its query heads, K/V are never repeated.
    qg = q.float().reshape(B, Hkv, g * Tq, D)
    if page_index is None:
        keys, vals = k.float(), v.float()
        kpos = torch.arange(Tk, device=dev).expand(B, Hkv, Tk)
        slot_ok = None
    else:
        npg = cdiv(Tk, page_size)
        P = page_index.shape[-1]
        pad = npg * page_size - Tk
        pid = page_index.long().clamp(0, npg - 1)
        flat = (torch.arange(B * Hkv, device=dev).view(B, Hkv, 1) * npg + pid).reshape(-1)
        keys = _gather_pages(k, flat, npg, page_size, "k").view(B, Hkv, P * page_size, D)
        vals = _gather_pages(v, flat, npg, page_size, "v").view(B, Hkv, P * page_size, D)
        kpos = (pid[..., None] * page_size + torch.arange(page_size, device=dev)).reshape(B, Hkv, P * page_size)
        slot_ok = (torch.arange(P, device=dev) < page_count.long()[..., None]).repeat_interleave(page_size, -1)
    s = torch.matmul(qg, keys.transpose(-1, -2)).mul_(scale)  # (B, Hkv, g*Tq, L)
    L = s.shape[-1]
    klen = torch.full((B,), Tk, device=dev) if kv_len is None else kv_len.long()
    ok = kpos < klen.view(B, 1, 1)
    if kv_start is not None:
        ok = ok & (kpos >= kv_start.long().view(B, 1, 1))
    if slot_ok is not None:
        ok = ok & slot_ok
    if Tq > 1 or kv_len is not None:
        qpos = klen.view(B, 1, 1) - Tq + torch.arange(Tq, device=dev).repeat(g).view(1, 1, g * Tq)
        ok4 = ok[:, :, None, :] & (kpos[:, :, None, :] <= qpos[..., None])
    else:
        ok4 = ok[:, :, None, :]
    if page_index is not None or kv_start is not None or kv_len is not None or Tq > 1:
        s.masked_fill_(~ok4.expand(B, Hkv, g * Tq, L), float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s.sub_(m).exp_()
    l = s.sum(-1)
    out = torch.matmul(s, vals)
    seen = l > 0
    l1 = torch.where(seen, l, torch.ones_like(l))
    out = (out / l1[..., None]).reshape(B, Hq, Tq, D).to(q.dtype)
    lse = torch.where(seen, m.squeeze(-1) + torch.log(l1), torch.full_like(l, float("-inf"))).reshape(B, Hq, Tq)
    return out, lse


_local = threading.local()


def _workspace(device: torch.device) -> Workspace:
    """A per-thread workspace per device, kept across decode steps (it holds at most the largest gathered
    pages seen)."""
    spaces = _local.__dict__.setdefault("spaces", {})
    if device not in spaces:
        spaces[device] = Workspace(device)
    return spaces[device]


def _gather_pages(x: torch.Tensor, flat: torch.Tensor, npg: int, page_size: int, name: str) -> torch.Tensor:
    """Pages ``flat`` (ids bh * npg + p into B*Hkv*npg) of x (B, Hkv, Tk, D) as fp32 (len(flat), page_size * D).

    Only the selected pages are copied (a decode step must not copy the whole cache): rows are read through an
    overlapping strided view of x (2-D index_select, a plain row copy). A partial last page reads past its
    head's keys (masked by the caller); only the padded tail of the last head is materialised. The result
    lives in a reused per-thread buffer (valid until the next call).
    """
    B, Hkv, Tk, D = x.shape
    n_tok = B * Hkv * Tk
    pad = npg * page_size - Tk
    if n_tok < page_size:
        return F.pad(x, (0, 0, 0, pad)).reshape(B * Hkv * npg, page_size * D).index_select(0, flat).float()
    x = x.contiguous()
    bh, pid = flat // npg, flat % npg
    rows = x.as_strided((n_tok - page_size + 1, page_size * D), (D, 1))
    start = (bh * Tk + pid * page_size).clamp(max=n_tok - page_size)
    shape = (flat.numel(), page_size * D)
    out = torch.index_select(rows, 0, start, out=_workspace(x.device).get(name, shape, x.dtype))
    if pad:
        last = ((pid == npg - 1) & (bh == B * Hkv - 1)).nonzero().squeeze(1)  # would run past the storage
        if last.numel():
            tail = F.pad(x[-1, -1, (npg - 1) * page_size:], (0, 0, 0, pad)).reshape(1, page_size * D)
            out[last] = tail.expand(last.numel(), -1)
    if out.dtype != torch.float32:
        out = _workspace(x.device).get(name + "32", shape).copy_(out)
    return out
