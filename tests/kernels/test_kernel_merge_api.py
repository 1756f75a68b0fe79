"""merge_attn_states, input validation, and the import guard."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from seqtool.errors import NotImplementedMethodError, ShapeError
from seqtool.kernels import block_sparse_attn, decode_attn, linear_attn, merge_attn_states
from seqtool.kernels.testing import assert_close, random_block_pattern


def _qkv(Hq=4, Hkv=2, T=128, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, T, D, generator=g) for h in (Hq, Hkv, Hkv)]


def test_merging_two_disjoint_block_sets_equals_their_union():
    q, k, v = _qkv(T=256)
    bi, bc = random_block_pattern(1, 4, 256, 256, block_q=64, block_k=64, keep=1.0)
    # split each row's list into even and odd slots
    first_bc = (bc + 1) // 2
    first_bi = bi[..., ::2].contiguous()
    second_bi = torch.cat([bi[..., 1::2], torch.zeros_like(bi[..., :1])], -1).contiguous()
    second_bc = bc // 2
    o1, l1 = block_sparse_attn(q, k, v, first_bi, first_bc, return_lse=True)
    o2, l2 = block_sparse_attn(q, k, v, second_bi, second_bc, return_lse=True)
    o, l = merge_attn_states(o1, l1, o2, l2)
    ref_o, ref_l = block_sparse_attn(q, k, v, bi, bc, return_lse=True)
    assert_close("merged out", ref_o, o, 1e-5)
    assert_close("merged lse", ref_l, l, 1e-5)


def test_merge_with_empty_parts():
    o = torch.randn(1, 1, 3, 4)
    lse = torch.tensor([[[0.5, float("-inf"), 1.0]]])
    none = torch.full_like(lse, float("-inf"))
    mo, ml = merge_attn_states(o, lse, torch.zeros_like(o), none)
    assert torch.equal(ml, lse)
    assert torch.allclose(mo[..., [0, 2], :], o[..., [0, 2], :]) and torch.equal(mo[..., 1, :], torch.zeros(1, 1, 4))


def test_bad_inputs_raise_shape_errors():
    q, k, v = _qkv()
    bi, bc = random_block_pattern(1, 4, 128, 128, block_q=64, block_k=64, keep=0.5)
    with pytest.raises(ShapeError, match="multiple"):
        block_sparse_attn(q, k[:, :1].expand(1, 3, 128, 32), v[:, :1].expand(1, 3, 128, 32), bi, bc)
    with pytest.raises(ShapeError, match="block_index"):
        block_sparse_attn(q, k, v, bi[:, :2], bc)
    with pytest.raises(ShapeError, match="dtypes differ"):
        block_sparse_attn(q.half(), k, v, bi, bc)
    with pytest.raises(ShapeError, match="outside"):
        block_sparse_attn(q, k, v, bi + 5, bc)
    with pytest.raises(ShapeError, match="more queries"):
        decode_attn(q, k[:, :, :10], v[:, :, :10])
    with pytest.raises(ShapeError, match="page_index"):
        decode_attn(q[:, :, :1], k, v, page_index=torch.tensor([[[0, 5]] * 2]))
    with pytest.raises(ShapeError, match="decay"):
        linear_attn(q, k, v, decay=torch.full((4,), 1.5))
    with pytest.raises(ShapeError, match="backend"):
        decode_attn(q[:, :, :1], k, v, backend="cuda")


def test_forward_only_ops_refuse_grad_inputs():
    q, k, v = _qkv()
    bi, bc = random_block_pattern(1, 4, 128, 128, block_q=64, block_k=64, keep=0.5)
    with pytest.raises(NotImplementedMethodError, match="no_grad"):
        block_sparse_attn(q.requires_grad_(), k, v, bi, bc)


def test_importing_kernels_does_not_import_triton():
    code = "import sys, seqtool.kernels; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_non_contiguous_bthd_views_match_contiguous():
    """Models hand over (B, T, H, D) projections transposed to (B, H, T, D): strided views must work."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 100, h, 32, generator=g).transpose(1, 2) for h in (4, 2, 2))
    bi, bc = random_block_pattern(1, 4, 100, 100, block_q=32, block_k=32, keep=0.6)
    got = block_sparse_attn(q, k, v, bi, bc, block_q=32, block_k=32)
    want = block_sparse_attn(q.contiguous(), k.contiguous(), v.contiguous(), bi, bc, block_q=32, block_k=32)
    assert torch.equal(got, want)
    got = decode_attn(q[:, :, -2:], k, v)
    assert torch.equal(got, decode_attn(q[:, :, -2:].contiguous(), k.contiguous(), v.contiguous()))
