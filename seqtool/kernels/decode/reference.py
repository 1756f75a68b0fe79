"""Dense-mask reference for decode_attn (small shapes only)."""
from __future__ import annotations

import torch

from ..block_sparse.reference import masked_attention_reference


def decode_token_mask(B, Hq, Hkv, Tq, Tk, *, page_index=None, page_count=None, page_size=64, kv_start=None,
                      kv_len=None) -> torch.Tensor:
    """(B, Hq, Tq, Tk) bool: key t visible to query i (query i sits at kv_len - Tq + i)."""
    g = Hq // Hkv
    kv_len = torch.full((B,), Tk) if kv_len is None else kv_len.cpu().long()
    kv_start = torch.zeros(B, dtype=torch.long) if kv_start is None else kv_start.cpu().long()
    mask = torch.zeros(B, Hq, Tq, Tk, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            if page_index is None:
                keys = set(range(Tk))
            else:
                keys = set()
                for s in range(int(page_count[b, h // g])):
                    p = int(page_index[b, h // g, s])
                    keys.update(range(p * page_size, min((p + 1) * page_size, Tk)))
            for i in range(Tq):
                qpos = int(kv_len[b]) - Tq + i
                for t in keys:
                    if int(kv_start[b]) <= t <= qpos and t < int(kv_len[b]):
                        mask[b, h, i, t] = True
    return mask


def decode_attn_reference(q, k, v, *, page_index=None, page_count=None, page_size=64, scale=None, kv_start=None,
                          kv_len=None):
    """Obviously-right decode_attn: token mask + masked dense attention. Returns (out, lse)."""
    B, Hq, Tq, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    mask = decode_token_mask(B, Hq, k.shape[1], Tq, k.shape[2],
                             page_index=None if page_index is None else page_index.cpu(),
                             page_count=None if page_count is None else page_count.cpu(), page_size=page_size,
                             kv_start=kv_start, kv_len=kv_len)
    return masked_attention_reference(q, k, v, mask, scale)
