"""PyTorch decode attention: query heads of a KV group attend together; only selected pages are gathered."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import cdiv


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
        kp = (F.pad(k.float(), (0, 0, 0, pad)) if pad else k.float()).reshape(B * Hkv * npg, page_size, D)
        vp = (F.pad(v.float(), (0, 0, 0, pad)) if pad else v.float()).reshape(B * Hkv * npg, page_size, D)
        pid = page_index.long().clamp(0, npg - 1)
        flat = (torch.arange(B * Hkv, device=dev).view(B, Hkv, 1) * npg + pid).reshape(-1)
        keys = kp.index_select(0, flat).view(B, Hkv, P * page_size, D)
        vals = vp.index_select(0, flat).view(B, Hkv, P * page_size, D)
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
