"""delta_rule_attn (chunked WY torch path, Triton) and delta_rule_attn_step against the token recurrence."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqtool.errors import ShapeError
from seqtool.kernels import delta_rule_attn, delta_rule_attn_step
from seqtool.kernels._common import HAS_TRITON
from seqtool.kernels.testing import assert_all_close, assert_close

NAMES = ("out", "final_state", "dq", "dk", "dv", "dbeta", "ds0", "dlog_decay")



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Thousands of tiny ops (the reference and step loops): a second thread only adds sync cost on a busy box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def _inputs(B, H, T, Dk, Dv, dtype, gated, seed=0, strength=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, T, Dk, generator=g) / Dk ** 0.5).to(dtype).requires_grad_()
    k = F.normalize(torch.randn(B, H, T, Dk, generator=g), dim=-1).to(dtype).requires_grad_()  # DeltaNet: unit keys
    v = torch.randn(B, H, T, Dv, generator=g).to(dtype).requires_grad_()
    beta = torch.sigmoid(torch.randn(B, H, T, generator=g)).to(dtype).requires_grad_()
    s0 = torch.randn(B, H, Dk, Dv, generator=g).requires_grad_()
    ld = (strength * F.logsigmoid(torch.randn(B, H, T, generator=g) + 2.0)).to(dtype).requires_grad_() if gated \
        else None
    return q, k, v, beta, s0, ld


def _grads(out, state, inputs):
    g = torch.Generator().manual_seed(9)
    loss = (out.float() * torch.randn(out.shape, generator=g)).sum() + (state * torch.randn(state.shape,
                                                                                            generator=g)).sum()
    return [out, state] + list(torch.autograd.grad(loss, [x for x in inputs if x is not None]))


def _chunked(backend, chunk, q, k, v, beta, s0, ld):
    out, state = delta_rule_attn(q, k, v, beta, log_decay=ld, chunk=chunk, initial_state=s0, return_state=True,
                                 scale=0.5, backend=backend)
    return _grads(out, state, [q, k, v, beta, s0, ld])


def _stepwise(q, k, v, beta, s0, ld):
    state, outs = s0, []
    for t in range(q.shape[2]):
        sl = slice(t, t + 1)
        o, state = delta_rule_attn_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], beta[:, :, sl], state,
                                        log_decay=None if ld is None else ld[:, :, sl], scale=0.5)
        outs.append(o)
    return _grads(torch.cat(outs, 2), state, [q, k, v, beta, s0, ld])


def _compare(ref, got, tol, what):
    assert_all_close(NAMES, ref, got, tol, what)


# (B, H, T, Dk, Dv, dtype, gated, chunk)
CASES = [
    (2, 2, 63, 64, 64, torch.float32, True, 16),
    (1, 2, 257, 60, 32, torch.float32, False, 64),
    (1, 1, 100, 128, 128, torch.float32, True, 64),
    (1, 2, 130, 64, 48, torch.bfloat16, True, 32),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-T{c[2]}-Dk{c[3]}-{str(c[5])[6:]}-"
                                                      f"{'gated' if c[6] else 'plain'}-c{c[7]}")
def test_chunked_and_recurrent_match_reference_with_grads(case):
    B, H, T, Dk, Dv, dtype, gated, chunk = case
    inputs = _inputs(B, H, T, Dk, Dv, dtype, gated)
    ref = _chunked("reference", chunk, *inputs)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    _compare(ref, _chunked("torch", chunk, *inputs), tol, "chunked")
    if T <= 130:
        _compare(ref, _stepwise(*inputs), tol, "stepwise")


@pytest.mark.parametrize("gated", [False, True])
def test_state_carried_over_two_calls_equals_one_call(gated):
    q, k, v, beta, s0, ld = _inputs(2, 2, 97, 16, 24, torch.float32, gated, seed=1)
    full = _chunked("torch", 32, q, k, v, beta, s0, ld)
    a, b = slice(0, 41), slice(41, None)
    o1, s1 = delta_rule_attn(q[:, :, a], k[:, :, a], v[:, :, a], beta[:, :, a], chunk=32, initial_state=s0,
                             log_decay=None if ld is None else ld[:, :, a], return_state=True, scale=0.5)
    o2, s2 = delta_rule_attn(q[:, :, b], k[:, :, b], v[:, :, b], beta[:, :, b], chunk=32, initial_state=s1,
                             log_decay=None if ld is None else ld[:, :, b], return_state=True, scale=0.5)
    _compare(full, _grads(torch.cat([o1, o2], 2), s2, [q, k, v, beta, s0, ld]), 1e-5, "two calls")


@pytest.mark.parametrize("gated", [False, True])
def test_segments_carry_the_state_exactly(gated):
    """Long inputs run in fixed segments of the chunked path: several segments == the reference, with grads."""
    from seqtool.kernels.delta_rule.torch_impl import delta_rule_torch

    q, k, v, beta, s0, ld = _inputs(1, 2, 150, 16, 8, torch.float32, gated, seed=5)
    out, st = delta_rule_torch(q, k, v, beta, log_decay=ld, chunk=16, scale=0.5, initial_state=s0, segment=48)
    _compare(_chunked("reference", 16, q, k, v, beta, s0, ld), _grads(out, st, [q, k, v, beta, s0, ld]), 1e-5,
             "segments")


def test_chunk_size_does_not_change_result():
    q, k, v, beta, s0, ld = _inputs(1, 2, 77, 16, 16, torch.float32, True, seed=2)
    with torch.no_grad():
        outs = [delta_rule_attn(q, k, v, beta, log_decay=ld, chunk=c, initial_state=s0) for c in (1, 20, 64, 128)]
    for c, o in zip((20, 64, 128), outs[1:]):
        assert_close(f"chunk 1 vs {c}", outs[0], o, 1e-5)


def test_strong_gate_stays_finite_and_exact():
    q, k, v, beta, s0, ld = _inputs(1, 2, 128, 16, 16, torch.float32, True, seed=3, strength=40.0)
    with torch.no_grad():
        out, st = delta_rule_attn(q, k, v, beta, log_decay=ld, chunk=64, initial_state=s0, return_state=True)
        ref, rst = delta_rule_attn(q, k, v, beta, log_decay=ld, initial_state=s0, return_state=True,
                                   backend="reference")
    assert torch.isfinite(out).all() and torch.isfinite(st).all()
    assert_close("out", ref, out, 1e-5)
    assert_close("state", rst, st, 1e-5)


def test_beta_one_overwrites_the_stored_value():
    """With beta = 1 and a unit key, writing (k, v) then reading with q = k returns exactly v (delta rule)."""
    k = F.normalize(torch.randn(1, 1, 2, 8, generator=torch.Generator().manual_seed(5)), dim=-1)
    k = torch.cat([k[:, :, :1], k[:, :, :1]], 2)  # the same key twice, two different values
    v = torch.randn(1, 1, 2, 4, generator=torch.Generator().manual_seed(6))
    out = delta_rule_attn(k, k, v, torch.ones(1, 1, 2), chunk=64)
    assert_close("recall of the latest value", v[:, :, 1], out[:, :, 1], 1e-5)


# (B, H, T, Dk, Dv, dtype, gated, chunk): tiny, the interpreter runs one token per loop iteration.
# A power-of-two chunk takes the chunked WY (tl.dot) forward, chunk 20 the recurrent one.
TRITON_CASES = [
    (2, 1, 40, 64, 64, torch.float32, True, 16),
    (1, 1, 33, 60, 32, torch.bfloat16, True, 20),
    (1, 1, 20, 128, 128, torch.float32, False, 16),
    (1, 1, 70, 32, 32, torch.float32, True, 64),
]


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"T{c[2]}-Dk{c[3]}-{str(c[5])[6:]}-"
                                                             f"{'gated' if c[6] else 'plain'}-c{c[7]}")
def test_triton_fwd_bwd_matches_reference(case):
    B, H, T, Dk, Dv, dtype, gated, chunk = case
    inputs = _inputs(B, H, T, Dk, Dv, dtype, gated, seed=4)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    _compare(_chunked("reference", chunk, *inputs), _chunked("triton", chunk, *inputs), tol, "triton")


def test_errors():
    q, k, v, beta, _, ld = _inputs(1, 2, 3, 4, 3, torch.float32, True)
    with pytest.raises(ShapeError, match="log_decay has shape"):
        delta_rule_attn(q, k, v, beta, log_decay=ld.detach()[..., None].expand(1, 2, 3, 4))
    with pytest.raises(ShapeError, match="beta must be"):
        delta_rule_attn(q, k, v, beta[..., :2])
    with pytest.raises(ShapeError, match="<= 0"):
        delta_rule_attn_step(q, k, v, beta, None, log_decay=ld.detach().abs() + 0.1)
    with pytest.raises(ShapeError, match="k .* must equal"):
        delta_rule_attn(q, k[:, :1], v, beta)
