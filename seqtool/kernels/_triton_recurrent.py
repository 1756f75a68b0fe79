"""Triton kernels shared by gated_linear_attn and delta_rule_attn: the recurrence with the state in registers.

One program per (batch * head, Dv block) walks the tokens in order with its (Dk, BLOCK_V) slice of the state
in registers: both updates are independent across value columns, so Dv splits into blocks without any
communication. The forward stores the state at the start of every ``chunk`` tokens (checkpoints). The
backward walks the chunks in reverse: it recomputes the chunk's per-token states from its checkpoint into a
small per-program scratch buffer, then runs the exact reverse-mode recurrence token by token (dS carried in
registers). Gradients that sum over value columns (dq, dk, dbeta, dg) are written per Dv block and summed
outside. Every product is elementwise + row/column sums in fp32 (no tl.dot), so bf16 inputs are exact in the
interpreter too. This is the fused-recurrent form (FLA's ``fused_recurrent``), not the tensor-core chunked form;
only gated linear attention with one decay per token and head (and a power-of-two chunk) has a chunked forward
(_gla_chunk_fwd, tl.dot per chunk), which writes the same checkpoints for the same backward.

Per token, with a = exp(g_t) (a scalar, or a vector over Dk for GLA), state S (Dk, Dv):
    S' = a * S ;  gated linear: S_t = S' + k^T v ;  delta: u = k S', w = beta (v - u), S_t = S' + k^T w ;
    o_t = scale * q S_t.
"""
from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from ._common import cdiv
from ._triton_utils import dot_fp32, pow2_at_least


@triton.jit
def _rec_fwd(Q, K, V, G, BETA, S0, O, SF, CK, T, NC, scale,
             DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CHUNK: tl.constexpr,
             HAS_G: tl.constexpr, PER_DIM: tl.constexpr, DELTA: tl.constexpr, HAS_S0: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)  # int64 offsets: B*H*T*D may exceed 2^31
    iv = tl.program_id(1).to(tl.int64)
    offs_k = tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    s_off = offs_k[:, None] * DV + offs_v[None, :]
    s_ok = k_ok[:, None] & v_ok[None, :]
    if HAS_S0:
        S = tl.load(S0 + bh * DK * DV + s_off, mask=s_ok, other=0.0)
    else:
        S = tl.zeros([BK, BV], tl.float32)
    qb = Q + bh * T * DK
    kb = K + bh * T * DK
    vb = V + bh * T * DV
    ob = O + bh * T * DV
    for c in range(0, NC):
        tl.store(CK + (bh * NC + c) * DK * DV + s_off, S, mask=s_ok)
        t_end = tl.minimum(c * CHUNK + CHUNK, T)
        for t in range(c * CHUNK, t_end):
            q = tl.load(qb + t * DK + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            k = tl.load(kb + t * DK + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            v = tl.load(vb + t * DV + offs_v, mask=v_ok, other=0.0).to(tl.float32)
            if HAS_G:
                if PER_DIM:
                    g = tl.load(G + (bh * T + t) * DK + offs_k, mask=k_ok, other=0.0)
                    S = S * tl.exp(g)[:, None]
                else:
                    S = S * tl.exp(tl.load(G + bh * T + t))
            if DELTA:
                beta = tl.load(BETA + bh * T + t)
                u = tl.sum(S * k[:, None], 0)
                v = beta * (v - u)
            S = S + k[:, None] * v[None, :]
            o = tl.sum(S * q[:, None], 0) * scale
            tl.store(ob + t * DV + offs_v, o.to(O.dtype.element_ty), mask=v_ok)
    tl.store(SF + bh * DK * DV + s_off, S, mask=s_ok)


@triton.jit
def _gla_chunk_fwd(Q, K, V, G, S0, O, SF, CK, T, NC, scale,
                   DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CHUNK: tl.constexpr,
                   HAS_S0: tl.constexpr, DOT_FP32: tl.constexpr):
    """Chunked forward for one decay per token and head (tensor-core dots): same outputs and checkpoints as
    _rec_fwd. In-chunk cumulative log-decays b; every exponent is <= 0."""
    bh = tl.program_id(0).to(tl.int64)  # int64 offsets: B*H*T*D may exceed 2^31
    iv = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, CHUNK)
    offs_k = tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    s_off = offs_k[:, None] * DV + offs_v[None, :]
    s_ok = k_ok[:, None] & v_ok[None, :]
    if HAS_S0:
        S = tl.load(S0 + bh * DK * DV + s_off, mask=s_ok, other=0.0)
    else:
        S = tl.zeros([BK, BV], tl.float32)
    causal = offs_c[:, None] >= offs_c[None, :]
    for c in range(0, NC):
        tl.store(CK + (bh * NC + c) * DK * DV + s_off, S, mask=s_ok)
        t = c * CHUNK + offs_c
        t_ok = t < T
        q = tl.load(Q + (bh * T + t[:, None]) * DK + offs_k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        k = tl.load(K + (bh * T + t[:, None]) * DK + offs_k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        v = tl.load(V + (bh * T + t[:, None]) * DV + offs_v[None, :], mask=t_ok[:, None] & v_ok[None, :], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        b = tl.cumsum(tl.load(G + bh * T + t, mask=t_ok, other=0.0), 0)
        blast = tl.sum(tl.where(offs_c == CHUNK - 1, b, 0.0), 0)
        w = tl.where(causal, tl.exp(tl.minimum(b[:, None] - b[None, :], 0.0)), 0.0)
        qk = tl.dot(q, tl.trans(k)) * w
        o = tl.dot(qk.to(v.dtype), v) + tl.dot(q.to(tl.float32) * tl.exp(b)[:, None], S)
        tl.store(O + (bh * T + t[:, None]) * DV + offs_v[None, :], (o * scale).to(O.dtype.element_ty),
                 mask=t_ok[:, None] & v_ok[None, :])
        kd = k.to(tl.float32) * tl.exp(blast - b)[:, None]
        S = S * tl.exp(blast) + tl.dot(tl.trans(kd), v.to(tl.float32))
    tl.store(SF + bh * DK * DV + s_off, S, mask=s_ok)


@triton.jit
def _delta_chunk_fwd(Q, K, V, G, BETA, S0, O, SF, CK, T, NC, scale,
                     DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CHUNK: tl.constexpr,
                     HAS_G: tl.constexpr, HAS_S0: tl.constexpr, DOT_FP32: tl.constexpr):
    """Chunked (WY) forward of the (gated) delta rule with tensor-core dots: same outputs and checkpoints as
    _rec_fwd. Per chunk: Tm = (I + L)^-1 by forward substitution (L_ij = beta_i k_i.k_j e^{b_i - b_j}, j < i),
    W = Tm (beta e^b K), U = Tm (beta V) - W S, out = (Q e^b) S + A U, S <- e^{b_C} S + (K e^{b_C - b})^T U."""
    bh = tl.program_id(0).to(tl.int64)  # int64 offsets: B*H*T*D may exceed 2^31
    iv = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, CHUNK)
    offs_k = tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    s_off = offs_k[:, None] * DV + offs_v[None, :]
    s_ok = k_ok[:, None] & v_ok[None, :]
    if HAS_S0:
        S = tl.load(S0 + bh * DK * DV + s_off, mask=s_ok, other=0.0)
    else:
        S = tl.zeros([BK, BV], tl.float32)
    causal = offs_c[:, None] >= offs_c[None, :]
    strict = offs_c[:, None] > offs_c[None, :]
    eye = tl.where(offs_c[:, None] == offs_c[None, :], 1.0, 0.0)
    for c in range(0, NC):
        tl.store(CK + (bh * NC + c) * DK * DV + s_off, S, mask=s_ok)
        t = c * CHUNK + offs_c
        t_ok = t < T
        q = tl.load(Q + (bh * T + t[:, None]) * DK + offs_k[None, :], mask=t_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        k = tl.load(K + (bh * T + t[:, None]) * DK + offs_k[None, :], mask=t_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        v = tl.load(V + (bh * T + t[:, None]) * DV + offs_v[None, :], mask=t_ok[:, None] & v_ok[None, :],
                    other=0.0).to(tl.float32)
        beta = tl.load(BETA + bh * T + t, mask=t_ok, other=0.0)
        if HAS_G:
            b = tl.cumsum(tl.load(G + bh * T + t, mask=t_ok, other=0.0), 0)
        else:
            b = tl.zeros([CHUNK], tl.float32)
        blast = tl.sum(tl.where(offs_c == CHUNK - 1, b, 0.0), 0)
        gam = tl.where(causal, tl.exp(tl.minimum(b[:, None] - b[None, :], 0.0)), 0.0)
        L = tl.where(strict, beta[:, None] * tl.dot(k, tl.trans(k)) * gam, 0.0)
        Tm = eye
        for i in range(1, CHUNK):  # rows of (I + L)^-1, top to bottom
            li = tl.sum(tl.where(offs_c[:, None] == i, L, 0.0), 0)  # row i of L, over columns j
            row = tl.where(offs_c == i, 1.0, 0.0) - tl.sum(li[:, None] * Tm, 0)
            Tm = tl.where(offs_c[:, None] == i, row[None, :], Tm)
        W = tl.dot(Tm, k * (beta * tl.exp(b))[:, None])  # (CHUNK, BK)
        U = tl.dot(Tm, v * beta[:, None]) - tl.dot(W, S)  # (CHUNK, BV)
        A = tl.dot(q, tl.trans(k)) * gam
        o = tl.dot(q * tl.exp(b)[:, None], S) + tl.dot(A, U)
        tl.store(O + (bh * T + t[:, None]) * DV + offs_v[None, :], (o * scale).to(O.dtype.element_ty),
                 mask=t_ok[:, None] & v_ok[None, :])
        S = S * tl.exp(blast) + tl.dot(tl.trans(k * tl.exp(blast - b)[:, None]), U)
    tl.store(SF + bh * DK * DV + s_off, S, mask=s_ok)


@triton.jit
def _rec_bwd(Q, K, V, G, BETA, CK, DO, DSF, SCR, DQ, DKP, DVO, DB, DG, DS0, T, NC, BHN, scale,
             DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, CHUNK: tl.constexpr,
             HAS_G: tl.constexpr, PER_DIM: tl.constexpr, DELTA: tl.constexpr, HAS_DSF: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)  # int64 offsets: B*H*T*D may exceed 2^31
    iv = tl.program_id(1).to(tl.int64)
    offs_k = tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    s_off = offs_k[:, None] * DV + offs_v[None, :]
    s_ok = k_ok[:, None] & v_ok[None, :]
    scr = SCR + (iv * BHN + bh) * CHUNK * BK * BV + offs_k[:, None] * BV + tl.arange(0, BV)[None, :]
    part = iv * BHN + bh  # row of the per-Dv-block partial sums
    if HAS_DSF:
        dS = tl.load(DSF + bh * DK * DV + s_off, mask=s_ok, other=0.0)
    else:
        dS = tl.zeros([BK, BV], tl.float32)
    qb = Q + bh * T * DK
    kb = K + bh * T * DK
    vb = V + bh * T * DV
    dob = DO + bh * T * DV
    for ci in range(0, NC):
        c = NC - 1 - ci
        t0 = c * CHUNK
        n = tl.minimum(t0 + CHUNK, T) - t0
        S = tl.load(CK + (bh * NC + c) * DK * DV + s_off, mask=s_ok, other=0.0)
        for i in range(0, n):  # recompute the states before each token of the chunk
            t = t0 + i
            tl.store(scr + i * BK * BV, S)
            k = tl.load(kb + t * DK + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            v = tl.load(vb + t * DV + offs_v, mask=v_ok, other=0.0).to(tl.float32)
            if HAS_G:
                if PER_DIM:
                    S = S * tl.exp(tl.load(G + (bh * T + t) * DK + offs_k, mask=k_ok, other=0.0))[:, None]
                else:
                    S = S * tl.exp(tl.load(G + bh * T + t))
            if DELTA:
                v = tl.load(BETA + bh * T + t) * (v - tl.sum(S * k[:, None], 0))
            S = S + k[:, None] * v[None, :]
        for j in range(0, n):  # reverse-mode recurrence, last token first
            i = n - 1 - j
            t = t0 + i
            Sp = tl.load(scr + i * BK * BV)
            q = tl.load(qb + t * DK + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            k = tl.load(kb + t * DK + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            v = tl.load(vb + t * DV + offs_v, mask=v_ok, other=0.0).to(tl.float32)
            do = tl.load(dob + t * DV + offs_v, mask=v_ok, other=0.0).to(tl.float32)
            if HAS_G:
                if PER_DIM:
                    a = tl.exp(tl.load(G + (bh * T + t) * DK + offs_k, mask=k_ok, other=0.0))
                    S1 = Sp * a[:, None]
                else:
                    a = tl.exp(tl.load(G + bh * T + t))
                    S1 = Sp * a
            else:
                S1 = Sp
            if DELTA:
                beta = tl.load(BETA + bh * T + t)
                r = v - tl.sum(S1 * k[:, None], 0)  # v - u
                w = beta * r
            else:
                w = v
            St = S1 + k[:, None] * w[None, :]
            tl.store(DQ + (part * T + t) * DK + offs_k, scale * tl.sum(St * do[None, :], 1), mask=k_ok)
            dS = dS + scale * q[:, None] * do[None, :]
            dk = tl.sum(dS * w[None, :], 1)
            dw = tl.sum(dS * k[:, None], 0)
            if DELTA:
                tl.store(DB + part * T + t, tl.sum(dw * r, 0))
                tl.store(DVO + (bh * T + t) * DV + offs_v, beta * dw, mask=v_ok)
                du = -beta * dw
                dS = dS + k[:, None] * du[None, :]
                dk += tl.sum(S1 * du[None, :], 1)
            else:
                tl.store(DVO + (bh * T + t) * DV + offs_v, dw, mask=v_ok)
            tl.store(DKP + (part * T + t) * DK + offs_k, dk, mask=k_ok)
            if HAS_G:
                if PER_DIM:
                    tl.store(DG + (part * T + t) * DK + offs_k, tl.sum(dS * S1, 1), mask=k_ok)
                    dS = dS * a[:, None]
                else:
                    tl.store(DG + part * T + t, tl.sum(tl.sum(dS * S1, 1), 0))
                    dS = dS * a
    tl.store(DS0 + bh * DK * DV + s_off, dS, mask=s_ok)


def _resource_errors() -> tuple:
    errs = []
    try:
        from triton.runtime.errors import OutOfResources
        errs.append(OutOfResources)
    except ImportError:
        pass
    try:
        from triton.compiler.errors import CompilationError
        errs.append(CompilationError)
    except ImportError:
        pass
    return tuple(errs)


def _try_chunked(launch) -> bool:
    """Launch a chunked forward; False (and the recurrent forward runs instead) if it does not fit this GPU
    (shared memory / registers at this chunk and head size). Any other error propagates."""
    try:
        launch()
        return True
    except _resource_errors() as e:
        warnings.warn(f"chunked Triton forward unavailable here ({type(e).__name__}); using the recurrent one",
                      stacklevel=3)
        return False


def _blocks(Dk: int, Dv: int) -> tuple[int, int]:
    bk = pow2_at_least(Dk)
    return bk, min(pow2_at_least(Dv), 64 if bk <= 64 else 32)


class RecurrentFn(torch.autograd.Function):
    """(q, k, v, g, beta, s0) -> (out, final_state); g/beta/s0 fp32 or None; Triton forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, s0, scale, chunk, per_dim):
        q, k, v = (t.contiguous() for t in (q, k, v))
        B, H, T, Dk = q.shape
        Dv = v.shape[-1]
        bk, bv = _blocks(Dk, Dv)
        nc = max(cdiv(T, chunk), 1)
        o = torch.empty(B, H, T, Dv, device=q.device, dtype=q.dtype)
        sf = torch.empty(B, H, Dk, Dv, device=q.device, dtype=torch.float32)
        ck = torch.empty(B, H, nc, Dk, Dv, device=q.device, dtype=torch.float32)
        dummy = sf
        grid = (B * H, cdiv(Dv, bv))
        pow2 = chunk >= 16 and chunk & (chunk - 1) == 0
        chunked = None
        if beta is not None and pow2:
            chunked = lambda: _delta_chunk_fwd[grid](  # noqa: E731
                q, k, v, g if g is not None else dummy, beta, s0 if s0 is not None else dummy, o, sf, ck, T, nc,
                float(scale), DK=Dk, DV=Dv, BK=bk, BV=bv, CHUNK=chunk, HAS_G=g is not None, HAS_S0=s0 is not None,
                DOT_FP32=dot_fp32(), num_warps=4)
        elif g is not None and beta is None and not per_dim and pow2:
            chunked = lambda: _gla_chunk_fwd[grid](  # noqa: E731
                q, k, v, g, s0 if s0 is not None else dummy, o, sf, ck, T, nc, float(scale),
                DK=Dk, DV=Dv, BK=bk, BV=bv, CHUNK=chunk, HAS_S0=s0 is not None, DOT_FP32=dot_fp32(), num_warps=4)
        if chunked is None or not _try_chunked(chunked):
            _rec_fwd[grid](
                q, k, v, g if g is not None else dummy, beta if beta is not None else dummy,
                s0 if s0 is not None else dummy, o, sf, ck, T, nc, float(scale),
                DK=Dk, DV=Dv, BK=bk, BV=bv, CHUNK=chunk, HAS_G=g is not None, PER_DIM=per_dim,
                DELTA=beta is not None, HAS_S0=s0 is not None, num_warps=4)
        ctx.save_for_backward(q, k, v, g, beta, ck)
        ctx.meta = (scale, chunk, per_dim)
        ctx.mark_non_differentiable(ck)
        return o, sf

    @staticmethod
    def backward(ctx, do, dsf):
        q, k, v, g, beta, ck = ctx.saved_tensors
        scale, chunk, per_dim = ctx.meta
        B, H, T, Dk = q.shape
        Dv = v.shape[-1]
        bk, bv = _blocks(Dk, Dv)
        nv, nc, bhn = cdiv(Dv, bv), ck.shape[2], B * H
        dev, f32 = q.device, torch.float32
        do = torch.zeros_like(v) if do is None else do.contiguous()
        scr = torch.empty(nv * bhn * chunk * bk * bv, device=dev, dtype=f32)
        dq = torch.empty(nv, B, H, T, Dk, device=dev, dtype=f32)
        dk = torch.empty(nv, B, H, T, Dk, device=dev, dtype=f32)
        dv = torch.empty(B, H, T, Dv, device=dev, dtype=f32)
        db = torch.empty(nv, B, H, T, device=dev, dtype=f32) if beta is not None else None
        dg = torch.empty((nv,) + tuple(g.shape), device=dev, dtype=f32) if g is not None else None
        ds0 = torch.empty(B, H, Dk, Dv, device=dev, dtype=f32)
        dummy = ds0
        _rec_bwd[(bhn, nv)](
            q, k, v, g if g is not None else dummy, beta if beta is not None else dummy, ck, do,
            dsf.contiguous() if dsf is not None else dummy, scr, dq, dk, dv,
            db if db is not None else dummy, dg if dg is not None else dummy, ds0, T, nc, bhn, float(scale),
            DK=Dk, DV=Dv, BK=bk, BV=bv, CHUNK=chunk, HAS_G=g is not None, PER_DIM=per_dim, DELTA=beta is not None,
            HAS_DSF=dsf is not None, num_warps=4)
        dq, dk = dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype)
        db = None if db is None else db.sum(0)
        dg = None if dg is None else dg.sum(0)
        return dq, dk, dv.to(v.dtype), dg, db, ds0, None, None, None


def recurrent_triton(q, k, v, *, log_decay=None, beta=None, initial_state=None, scale=1.0, chunk=64):
    """Shared entry: gated linear attention when beta is None, the (gated) delta rule otherwise."""
    g = None if log_decay is None else log_decay.float().contiguous()
    b = None if beta is None else beta.float().contiguous()
    s0 = None if initial_state is None else initial_state.float().contiguous()
    per_dim = g is not None and g.dim() == 4
    return RecurrentFn.apply(q, k, v, g, b, s0, float(scale), int(chunk), per_dim)
