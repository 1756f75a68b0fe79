"""The CPU paths do work proportional to the kept blocks/pages and never build a Tq x Tk tensor."""
from __future__ import annotations

import torch

from seqtool.kernels import block_sparse_attn, decode_attn
from seqtool.kernels.testing import LargestTensorMode, counted_flops, random_block_pattern






def test_block_sparse_flops_equal_kept_blocks():
    T, D, bs = 2048, 32, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, T, D, generator=g) for _ in range(3))
    flops = {}
    for keep in (0.1, 0.5):
        bi, bc = random_block_pattern(1, 2, T, T, block_q=bs, block_k=bs, keep=keep, generator=g)
        flops[keep] = counted_flops(lambda: block_sparse_attn(q, k, v, bi, bc, block_q=bs, block_k=bs))
        # two matmuls (QK^T and PV) of 2 * bs * bs * D each per kept block, nothing else
        assert flops[keep] == int(bc.sum()) * 4 * bs * bs * D
    assert flops[0.1] < 0.3 * flops[0.5]


def test_block_sparse_never_materialises_q_by_k():
    T, D = 4096, 32
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, T, D, generator=g) for _ in range(3))
    bi, bc = random_block_pattern(1, 1, T, T, block_q=64, block_k=64, keep=0.2, generator=g)
    with LargestTensorMode() as seen:
        block_sparse_attn(q, k, v, bi, bc)
    assert seen.largest < T * T // 4


def test_decode_flops_scale_with_pages():
    T, D = 4096, 64
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 8, 1, D, generator=g)
    k, v = (torch.randn(1, 2, T, D, generator=g) for _ in range(2))
    dense = counted_flops(lambda: decode_attn(q, k, v))
    pages = torch.stack([torch.randperm(T // 64, generator=g)[:8] for _ in range(2)]).view(1, 2, 8).to(torch.int32)
    sparse = counted_flops(lambda: decode_attn(q, k, v, page_index=pages))
    assert dense == 8 * 4 * T * D
    assert sparse == 8 * 4 * (8 * 64) * D
