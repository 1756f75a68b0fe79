"""decode_attn: torch path and Triton split-KV (interpreter) against the reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqtool.kernels import decode_attn
from seqtool.kernels._common import HAS_TRITON
from seqtool.kernels.testing import assert_close

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _case(B, Hq, Hkv, Tq, Tk, D, dtype, page_size, n_pages, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, t, D, generator=g).to(dtype) for h, t in ((Hq, Tq), (Hkv, Tk), (Hkv, Tk)))
    npg = -(-Tk // page_size)
    pages = torch.stack([torch.randperm(npg, generator=g)[:n_pages] for _ in range(B * Hkv)]).view(B, Hkv, -1)
    count = torch.randint(0, pages.shape[-1] + 1, (B, Hkv), generator=g)
    count[0, 0] = pages.shape[-1]
    return q, k, v, pages.to(torch.int32), count.to(torch.int32)


def _compare(q, k, v, backend, **kw):
    out, lse = decode_attn(q, k, v, return_lse=True, backend=backend, **kw)
    ref_o, ref_l = decode_attn(q, k, v, return_lse=True, backend="reference", **kw)
    assert out.shape == q.shape and lse.dtype == torch.float32
    assert_close("out", ref_o, out, TOL[q.dtype])
    assert_close("lse", ref_l, lse, 1e-5)


# (B, Hq, Hkv, Tq, Tk, D, dtype, page_size, n_pages)
CASES = [
    (2, 4, 2, 1, 63, 64, torch.float32, 16, 3),
    (2, 8, 2, 5, 257, 60, torch.float16, 32, 4),
    (1, 4, 1, 16, 300, 128, torch.float32, 64, 5),
    (2, 4, 4, 3, 257, 64, torch.bfloat16, 16, 10),
]
IDS = [f"Tq{c[3]}-Tk{c[4]}-D{c[5]}-g{c[1] // c[2]}-{c[6]}" for c in CASES]


def _variants(Tk, B, pages, count, ps):
    kv_len = torch.tensor([Tk, Tk - 7][:B])
    kv_start = torch.tensor([0, 9][:B])
    return [
        dict(page_size=ps),
        dict(page_size=ps, kv_len=kv_len, kv_start=kv_start),
        dict(page_size=ps, page_index=pages, page_count=count, kv_len=kv_len),
    ]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_torch_path_matches_reference(case):
    B, Hq, Hkv, Tq, Tk, D, dtype, ps, npages = case
    q, k, v, pages, count = _case(*case)
    for kw in _variants(Tk, B, pages, count, ps):
        _compare(q, k, v, "torch", **kw)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("case", [c for c in CASES if c[6] != torch.bfloat16], ids=IDS[:3])
def test_triton_split_kv_matches_reference(case):
    B, Hq, Hkv, Tq, Tk, D, dtype, ps, npages = case
    q, k, v, pages, count = _case(*case)
    for kw in _variants(Tk, B, pages, count, ps):
        _compare(q, k, v, "triton", **kw)


def test_all_pages_equal_dense_sdpa():
    q, k, v, _, _ = _case(1, 4, 2, 1, 256, 64, torch.float32, 64, 4)
    every = torch.arange(4, dtype=torch.int32).expand(1, 2, 4).contiguous()
    out = decode_attn(q, k, v, page_index=every)
    dense = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    assert_close("all pages vs sdpa", dense, out, 1e-5)
    assert_close("no pages vs sdpa", dense, decode_attn(q, k, v), 1e-5)
