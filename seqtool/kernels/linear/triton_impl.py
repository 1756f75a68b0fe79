"""Triton chunked linear attention (Lightning Attention-2 style): one program per (batch*head, Dv block) walks
the chunks in order, keeping the (Dk, BLOCK_V) state in registers. The backward reuses the same kernel:
dq is a forward pass with (q, k, v) -> (do, v, k); dk and dv are forward passes over time-reversed inputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqtool.errors import NotImplementedMethodError

from .._triton_utils import check_block, dot_fp32, pow2_at_least


@triton.jit
def _la_fwd(Q, K, V, LOGD, S0, O, SF,
            sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
            H, QG, KG, T, scale,
            DK: tl.constexpr, DV: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr,
            STORE_SF: tl.constexpr, DOT_FP32: tl.constexpr,
            BLOCK_C: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_V: tl.constexpr):
    bh = tl.program_id(0)
    iv = tl.program_id(1)
    b = bh // H
    h = bh % H
    hq = h // QG
    hk = h // KG
    offs_c = tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_DK)
    offs_v = iv * BLOCK_V + tl.arange(0, BLOCK_V)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    a = 0.0
    if HAS_DECAY:
        a = tl.load(LOGD + h)
    fi = offs_c.to(tl.float32)
    diff = fi[:, None] - fi[None, :]
    intra_w = tl.where(diff >= 0, tl.exp(a * tl.maximum(diff, 0.0)), 0.0)
    q_w = tl.exp(a * (fi + 1.0))
    s_ptr = (b * H + h) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
    if HAS_S0:
        S = tl.load(S0 + s_ptr, mask=k_ok[:, None] & v_ok[None, :], other=0.0)
    else:
        S = tl.zeros([BLOCK_DK, BLOCK_V], tl.float32)
    qb = Q + b * sqb + hq * sqh
    kb = K + b * skb + hk * skh
    vb = V + b * svb + hk * svh
    ob = O + b * sob + h * soh
    for c0 in range(0, T, BLOCK_C):
        t = c0 + offs_c
        t_ok = t < T
        q = tl.load(qb + t[:, None] * sqt + offs_k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        k = tl.load(kb + t[:, None] * skt + offs_k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        v = tl.load(vb + t[:, None] * svt + offs_v[None, :], mask=t_ok[:, None] & v_ok[None, :], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k)) * intra_w
        o = tl.dot(qk.to(v.dtype), v)
        o += tl.dot(q.to(tl.float32) * q_w[:, None], S)
        tl.store(ob + t[:, None] * sot + offs_v[None, :], (o * scale).to(O.dtype.element_ty),
                 mask=t_ok[:, None] & v_ok[None, :])
        L = tl.minimum(T - c0, BLOCK_C).to(tl.float32)
        k_w = tl.where(t_ok, tl.exp(a * tl.maximum(L - 1.0 - fi, 0.0)), 0.0)
        S = S * tl.exp(a * L) + tl.dot(tl.trans(k.to(tl.float32) * k_w[:, None]), v.to(tl.float32))
    if STORE_SF:
        tl.store(SF + s_ptr, S, mask=k_ok[:, None] & v_ok[None, :])


def _launch(q, k, v, log_decay, s0, scale, chunk, *, want_state, out_dtype):
    """o[h] from q-role q (H/QG heads), k/v-role k, v (H/KG heads); H = q-role heads * QG. Returns (o, S)."""
    B, Hqr, T, DK = q.shape
    Hkr, DV = k.shape[1], v.shape[-1]
    H = max(Hqr, Hkr)
    o = torch.empty(B, H, T, DV, device=q.device, dtype=out_dtype)
    sf = torch.empty(B, H, DK, DV, device=q.device, dtype=torch.float32) if want_state else o
    block_dk = pow2_at_least(DK)
    block_v = min(pow2_at_least(DV), 64)
    grid = (B * H, triton.cdiv(DV, block_v))
    dummy = o
    _la_fwd[grid](
        q, k, v, log_decay if log_decay is not None else dummy, s0 if s0 is not None else dummy, o, sf,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        H, H // Hqr, H // Hkr, T, scale,
        DK=DK, DV=DV, HAS_DECAY=log_decay is not None, HAS_S0=s0 is not None, STORE_SF=want_state,
        DOT_FP32=dot_fp32(), BLOCK_C=chunk, BLOCK_DK=block_dk, BLOCK_V=block_v,
        num_warps=4, num_stages=2,
    )
    return o, (sf if want_state else None)


def _flip(x):
    return torch.flip(x, dims=[2])


class _LinearAttnFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, s0, scale, chunk):
        q, k, v = (t.contiguous() for t in (q, k, v))
        o, sf = _launch(q, k, v, log_decay, s0, scale, chunk, want_state=True, out_dtype=q.dtype)
        ctx.save_for_backward(q, k, v, log_decay, s0)
        ctx.scale, ctx.chunk = scale, chunk
        return o, sf

    @staticmethod
    def backward(ctx, do, dsf):
        q, k, v, log_decay, s0 = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        B, Hq, T, DK = q.shape
        Hkv, DV = k.shape[1], v.shape[-1]
        g = Hq // Hkv
        do = (do.float() * scale).to(q.dtype).contiguous() if do is not None else torch.zeros_like(q[..., :1]).expand(
            B, Hq, T, DV).contiguous()
        f32 = torch.float32
        # dq_t = sum_{s<=t} l^(t-s) (do_t . v_s) k_s + l^(t+1) do_t S0^T
        s0t = s0.transpose(-1, -2).contiguous() if s0 is not None else None
        dq, _ = _launch(do, v, k, log_decay, s0t, 1.0, chunk, want_state=False, out_dtype=f32)
        # Reversed time: dk_s = sum_{t>=s} l^(t-s) (v_s . do_t) q_t ; dv_s = sum_{t>=s} l^(t-s) (k_s . q_t) do_t
        qr, kr, vr, dor = _flip(q), _flip(k), _flip(v), _flip(do)
        dk, _ = _launch(vr, dor, qr, log_decay, None, 1.0, chunk, want_state=False, out_dtype=f32)
        dv, _ = _launch(kr, qr, dor, log_decay, None, 1.0, chunk, want_state=False, out_dtype=f32)
        dk, dv = _flip(dk), _flip(dv)
        t = torch.arange(T, device=q.device, dtype=f32)
        a = log_decay.view(1, Hq, 1) if log_decay is not None else torch.zeros(1, Hq, 1, device=q.device)
        if dsf is not None:
            # The final state adds l^(T-1-s) k_s^T v_s: its gradient reaches every k_s and v_s.
            w = torch.exp(a * (T - 1 - t)).unsqueeze(-1)  # (1, Hq, T, 1)
            vf = v.float().repeat_interleave(g, 1)
            kf = k.float().repeat_interleave(g, 1)
            dk = dk + w * (vf @ dsf.transpose(-1, -2))
            dv = dv + w * (kf @ dsf)
        ds0 = None
        if s0 is not None and ctx.needs_input_grad[4]:
            qw = q.float() * torch.exp(a * (t + 1)).unsqueeze(-1)
            ds0 = qw.transpose(-1, -2) @ do.float()
            if dsf is not None:
                ds0 = ds0 + torch.exp(a * T).unsqueeze(-1) * dsf
        dk = dk.view(B, Hkv, g, T, DK).sum(2).to(k.dtype)
        dv = dv.view(B, Hkv, g, T, DV).sum(2).to(v.dtype)
        return dq.to(q.dtype), dk, dv, None, ds0, None, None


def linear_attn_triton(q, k, v, *, decay=None, chunk_size=64, scale=1.0, initial_state=None):
    """Chunked linear attention with a Triton forward and backward. Returns (out, final state fp32)."""
    op = "linear_attn"
    check_block(chunk_size, "chunk_size", op)
    if decay is not None and decay.requires_grad and torch.is_grad_enabled():
        raise NotImplementedMethodError(f"{op}: the triton backend has no gradient for decay; use backend='torch'")
    log_decay = None if decay is None else torch.log(decay.detach().float()).contiguous()
    s0 = None if initial_state is None else initial_state.float().contiguous()
    return _LinearAttnFn.apply(q, k, v, log_decay, s0, float(scale), chunk_size)
