"""linear_attn (chunked, fwd + bwd) and linear_attn_step against the token recurrence."""
from __future__ import annotations

import pytest
import torch

from seqtool.kernels import linear_attn, linear_attn_step
from seqtool.kernels._common import HAS_TRITON
from seqtool.kernels.testing import assert_close


def _inputs(B, Hq, Hkv, T, Dk, Dv, dtype, decay, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Unit-norm-ish features keep the un-normalised sums in a sane range.
    q = (torch.randn(B, Hq, T, Dk, generator=g) / Dk ** 0.5).to(dtype).requires_grad_()
    k = (torch.randn(B, Hkv, T, Dk, generator=g) / Dk ** 0.5).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, T, Dv, generator=g).to(dtype).requires_grad_()
    s0 = torch.randn(B, Hq, Dk, Dv, generator=g).requires_grad_()
    lam = (0.8 + 0.2 * torch.rand(Hq, generator=g)) if decay else None
    return q, k, v, s0, lam


def _run(backend, q, k, v, s0, lam, chunk, scale=0.5):
    out, final = linear_attn(q, k, v, decay=lam, chunk_size=chunk, initial_state=s0, output_final_state=True,
                             scale=scale, backend=backend)
    g = torch.Generator().manual_seed(9)
    w_o, w_s = torch.randn(out.shape, generator=g), torch.randn(final.shape, generator=g)
    loss = (out.float() * w_o).sum() + (final * w_s).sum()
    grads = torch.autograd.grad(loss, [q, k, v, s0])
    return out, final, grads


def _compare(backend, case, out_tol, grad_tol):
    B, Hq, Hkv, T, Dk, Dv, dtype, decay, chunk = case
    q, k, v, s0, lam = _inputs(B, Hq, Hkv, T, Dk, Dv, dtype, decay)
    out, final, grads = _run(backend, q, k, v, s0, lam, chunk)
    r_out, r_final, r_grads = _run("reference", q, k, v, s0, lam, chunk)
    assert out.dtype == dtype and final.dtype == torch.float32
    assert_close("out", r_out, out, out_tol)
    assert_close("final_state", r_final, final, out_tol)
    for name, r, g in zip(("dq", "dk", "dv", "ds0"), r_grads, grads):
        assert_close(name, r, g, grad_tol)


# (B, Hq, Hkv, T, Dk, Dv, dtype, decay, chunk)
CPU_CASES = [
    (2, 4, 2, 63, 16, 24, torch.float32, True, 16),
    (1, 2, 1, 257, 64, 64, torch.float32, False, 64),
    (1, 4, 4, 100, 60, 32, torch.float32, True, 32),
    (1, 4, 1, 130, 32, 32, torch.bfloat16, True, 64),
]


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"T{c[3]}-Dk{c[4]}-g{c[1] // c[2]}-{c[6]}-decay{c[7]}")
def test_torch_chunked_matches_recurrence_with_grads(case):
    tol = 2e-2 if case[6] == torch.bfloat16 else 1e-5
    _compare("torch", case, tol, tol)


TRITON_CASES = [
    (2, 4, 2, 63, 16, 24, torch.float32, True, 16),
    (1, 2, 1, 100, 32, 32, torch.float16, False, 32),
    (1, 2, 2, 70, 60, 64, torch.float32, True, 32),
]


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"T{c[3]}-Dk{c[4]}-g{c[1] // c[2]}-{c[6]}")
def test_triton_fwd_bwd_matches_recurrence(case):
    tol = 2e-3 if case[6] == torch.float16 else 1e-5
    _compare("triton", case, tol, tol)


def test_decay_gradient_on_torch_path():
    q, k, v, s0, lam = _inputs(1, 2, 1, 40, 8, 8, torch.float32, True)
    lam = lam.clone().requires_grad_()
    out = linear_attn(q, k, v, decay=lam, chunk_size=16, backend="torch")
    ref, _ = linear_attn(q, k, v, decay=lam, output_final_state=True, backend="reference")
    (g,) = torch.autograd.grad(out.sum(), [lam])
    (rg,) = torch.autograd.grad(ref.sum(), [lam])
    assert_close("d decay", rg, g, 1e-4)


@pytest.mark.parametrize("decay", [False, True])
def test_chunk_size_does_not_change_result(decay):
    q, k, v, s0, lam = _inputs(1, 2, 2, 97, 16, 16, torch.float32, decay)
    with torch.no_grad():
        a = linear_attn(q, k, v, decay=lam, chunk_size=16)
        b = linear_attn(q, k, v, decay=lam, chunk_size=128)
    assert_close("chunk 16 vs 128", a, b, 1e-5)


def test_step_form_continues_chunked_prefill():
    """Chunked prefill, then token-by-token decode carrying the state == one pass over everything."""
    q, k, v, s0, lam = _inputs(2, 4, 2, 50, 16, 24, torch.float32, True)
    with torch.no_grad():
        full, full_state = linear_attn(q, k, v, decay=lam, initial_state=s0, output_final_state=True, chunk_size=16)
        pre, state = linear_attn(q[:, :, :41], k[:, :, :41], v[:, :, :41], decay=lam, initial_state=s0,
                                 output_final_state=True, chunk_size=16)
        outs = [pre]
        for t in range(41, 50):
            o, state = linear_attn_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, decay=lam)
            outs.append(o)
    assert_close("prefill + steps", full, torch.cat(outs, 2), 1e-5)
    assert_close("state", full_state, state, 1e-5)


def test_step_from_empty_state_is_first_token_attention():
    q, k, v, _, _ = _inputs(1, 2, 1, 1, 4, 3, torch.float32, False)
    with torch.no_grad():
        o, s = linear_attn_step(q, k, v, None)
        expect = (q * k).sum(-1, keepdim=True) * v
    assert_close("first token", expect, o, 1e-6)
    assert s.shape == (1, 2, 4, 3)
