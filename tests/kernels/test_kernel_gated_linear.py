"""gated_linear_attn (chunked torch, Triton) and gated_linear_attn_step against the token recurrence."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqtool.errors import ShapeError
from seqtool.kernels import gated_linear_attn, gated_linear_attn_step
from seqtool.kernels._common import HAS_TRITON
from seqtool.kernels.testing import assert_all_close, assert_close

NAMES = ("out", "final_state", "dq", "dk", "dv", "dlog_decay", "ds0")



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Thousands of tiny ops (the reference and step loops): a second thread only adds sync cost on a busy box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def _inputs(B, H, T, Dk, Dv, dtype, per_dim, seed=0, strength=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, T, Dk, generator=g) / Dk ** 0.5).to(dtype).requires_grad_()
    k = (torch.randn(B, H, T, Dk, generator=g) / Dk ** 0.5).to(dtype).requires_grad_()
    v = torch.randn(B, H, T, Dv, generator=g).to(dtype).requires_grad_()
    s0 = torch.randn(B, H, Dk, Dv, generator=g).requires_grad_()
    x = torch.randn((B, H, T, Dk) if per_dim else (B, H, T), generator=g) + 2.0  # mostly slow decays, a few fast
    log_decay = (strength * F.logsigmoid(x)).to(dtype).requires_grad_()
    return q, k, v, log_decay, s0


def _grads(out, state, inputs):
    g = torch.Generator().manual_seed(9)
    loss = (out.float() * torch.randn(out.shape, generator=g)).sum() + (state * torch.randn(state.shape,
                                                                                            generator=g)).sum()
    return [out, state] + list(torch.autograd.grad(loss, inputs))


def _chunked(backend, chunk, q, k, v, ld, s0):
    out, state = gated_linear_attn(q, k, v, ld, chunk=chunk, initial_state=s0, return_state=True, scale=0.5,
                                   backend=backend)
    return _grads(out, state, [q, k, v, ld, s0])


def _stepwise(q, k, v, ld, s0):
    state, outs = s0, []
    for t in range(q.shape[2]):
        o, state = gated_linear_attn_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], ld[:, :, t:t + 1],
                                          state, scale=0.5)
        outs.append(o)
    return _grads(torch.cat(outs, 2), state, [q, k, v, ld, s0])


def _compare(ref, got, tol, what):
    assert_all_close(NAMES, ref, got, tol, what)


# (B, H, T, Dk, Dv, dtype, per_dim, chunk)
CASES = [
    (2, 2, 63, 64, 64, torch.float32, False, 16),
    (1, 2, 257, 60, 32, torch.float32, True, 64),
    (1, 1, 100, 128, 128, torch.float32, False, 64),
    (1, 2, 130, 64, 48, torch.bfloat16, True, 32),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-T{c[2]}-Dk{c[3]}-{str(c[5])[6:]}-"
                                                      f"{'dim' if c[6] else 'head'}-c{c[7]}")
def test_chunked_and_recurrent_match_reference_with_grads(case):
    B, H, T, Dk, Dv, dtype, per_dim, chunk = case
    inputs = _inputs(B, H, T, Dk, Dv, dtype, per_dim)
    ref = _chunked("reference", chunk, *inputs)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    _compare(ref, _chunked("torch", chunk, *inputs), tol, "chunked")
    if T <= 130:  # the step loop is the slow part; two cases are enough for it
        _compare(ref, _stepwise(*inputs), tol, "stepwise")


@pytest.mark.parametrize("per_dim", [False, True])
def test_state_carried_over_two_calls_equals_one_call(per_dim):
    q, k, v, ld, s0 = _inputs(2, 2, 97, 16, 24, torch.float32, per_dim, seed=1)
    full = _chunked("torch", 32, q, k, v, ld, s0)
    sp = 41
    o1, s1 = gated_linear_attn(q[:, :, :sp], k[:, :, :sp], v[:, :, :sp], ld[:, :, :sp], chunk=32, initial_state=s0,
                               return_state=True, scale=0.5)
    o2, s2 = gated_linear_attn(q[:, :, sp:], k[:, :, sp:], v[:, :, sp:], ld[:, :, sp:], chunk=32, initial_state=s1,
                               return_state=True, scale=0.5)
    _compare(full, _grads(torch.cat([o1, o2], 2), s2, [q, k, v, ld, s0]), 1e-5, "two calls")


@pytest.mark.parametrize("per_dim", [False, True])
def test_segments_carry_the_state_exactly(per_dim):
    """Long inputs run in fixed segments of the chunked path: several segments == the reference, with grads."""
    from seqtool.kernels.gated_linear.torch_impl import gated_linear_attn_torch

    q, k, v, ld, s0 = _inputs(1, 2, 150, 16, 8, torch.float32, per_dim, seed=5)
    out, st = gated_linear_attn_torch(q, k, v, ld, chunk=16, scale=0.5, initial_state=s0, segment=48)
    _compare(_chunked("reference", 16, q, k, v, ld, s0), _grads(out, st, [q, k, v, ld, s0]), 1e-5, "segments")


def test_chunk_size_does_not_change_result():
    q, k, v, ld, s0 = _inputs(1, 2, 77, 16, 16, torch.float32, True, seed=2)
    with torch.no_grad():
        outs = [gated_linear_attn(q, k, v, ld, chunk=c, initial_state=s0) for c in (1, 20, 64, 128)]
    for c, o in zip((20, 64, 128), outs[1:]):
        assert_close(f"chunk 1 vs {c}", outs[0], o, 1e-5)


@pytest.mark.parametrize("per_dim", [False, True])
def test_strong_decay_stays_finite_and_exact(per_dim):
    """Decays of e^-40 per token: naive exp(+cumsum) factorisations overflow inside a 64-token chunk."""
    q, k, v, ld, s0 = _inputs(1, 2, 128, 16, 16, torch.float32, per_dim, seed=3, strength=40.0)
    with torch.no_grad():
        out, st = gated_linear_attn(q, k, v, ld, chunk=64, initial_state=s0, return_state=True)
        ref, rst = gated_linear_attn(q, k, v, ld, initial_state=s0, return_state=True, backend="reference")
    assert torch.isfinite(out).all() and torch.isfinite(st).all()
    assert_close("out", ref, out, 1e-5)
    assert_close("state", rst, st, 1e-5)


# (B, H, T, Dk, Dv, dtype, per_dim, chunk): tiny, the interpreter runs one token per loop iteration.
# A power-of-two chunk takes the chunked (tl.dot) forward, chunk 20 and per-dim decay the recurrent one.
TRITON_CASES = [
    (2, 1, 40, 64, 64, torch.float32, False, 16),
    (1, 1, 33, 60, 32, torch.bfloat16, False, 20),
    (1, 1, 20, 128, 128, torch.float32, True, 16),
]


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"T{c[2]}-Dk{c[3]}-{str(c[5])[6:]}-"
                                                             f"{'dim' if c[6] else 'head'}-c{c[7]}")
def test_triton_fwd_bwd_matches_reference(case):
    B, H, T, Dk, Dv, dtype, per_dim, chunk = case
    inputs = _inputs(B, H, T, Dk, Dv, dtype, per_dim, seed=4)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    _compare(_chunked("reference", chunk, *inputs), _chunked("triton", chunk, *inputs), tol, "triton")


def test_step_without_state_and_errors():
    q, k, v, ld, _ = _inputs(1, 2, 1, 4, 3, torch.float32, False)
    with torch.no_grad():
        o, s = gated_linear_attn_step(q, k, v, ld, None)
        assert_close("first token", (q * k).sum(-1, keepdim=True) * v, o, 1e-6)
    assert s.shape == (1, 2, 4, 3) and s.dtype == torch.float32
    with pytest.raises(ShapeError, match="<= 0"):
        gated_linear_attn(q, k, v, ld.detach().abs() + 0.1)
    with pytest.raises(ShapeError, match="log_decay has shape"):
        gated_linear_attn(q, k, v, ld.detach()[..., None].expand(1, 2, 1, 3))
    with pytest.raises(ShapeError, match="state must be"):
        gated_linear_attn(q, k, v, ld, initial_state=torch.zeros(1, 2, 3, 4))
    with pytest.raises(ShapeError, match="chunk"):
        gated_linear_attn(q, k, v, ld, chunk=0)
