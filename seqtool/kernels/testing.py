"""Comparison helper shared by kernel tests and the GPU check script."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def rel_rms(ref: torch.Tensor, got: torch.Tensor) -> float:
    """Root-mean-square error relative to the reference's RMS (finite entries must match as -inf/inf)."""
    ref, got = ref.detach().double().cpu(), got.detach().double().cpu()
    fin = torch.isfinite(ref)
    if not torch.equal(fin, torch.isfinite(got)) or not torch.equal(ref[~fin], got[~fin]):
        return float("inf")
    r, g = ref[fin], got[fin]
    if r.numel() == 0:
        return 0.0
    err = (r - g).pow(2).mean().sqrt()
    base = r.pow(2).mean().sqrt().clamp_min(1e-12)
    return float(err / base)


def assert_close(name: str, ref: torch.Tensor, got: torch.Tensor, ratio: float = 1e-3) -> None:
    """Assert rel_rms(ref, got) <= ratio; shapes must match exactly."""
    assert ref.shape == got.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    err = rel_rms(ref, got)
    assert err <= ratio, f"{name}: relative RMS error {err:.3g} > {ratio:g}"


def assert_all_close(names, ref, got, ratio: float, what: str) -> None:
    """``assert_close`` over matching tensors of two results (outputs, states, gradients), with equal dtypes."""
    assert len(ref) == len(got)
    for name, r, g in zip(names, ref, got):
        assert g.dtype == r.dtype, f"{what} {name}: dtype {g.dtype} != {r.dtype}"
        assert_close(f"{what} {name}", r, g, ratio)


def random_block_pattern(B: int, H: int, Tq: int, Tk: int, *, block_q: int, block_k: int, keep: float,
                         generator: torch.Generator | None = None, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random causal block lists keeping about `keep` of each query block's causal key blocks (>= 1, always
    the diagonal block). Returns (block_index (B, H, nq, width) int32, block_count (B, H, nq) int32)."""
    nq, nkb = -(-Tq // block_q), -(-Tk // block_k)
    gen_device = generator.device if generator is not None else torch.device(device)
    last_q = torch.clamp((torch.arange(nq, device=gen_device) + 1) * block_q, max=Tq) - 1 + (Tk - Tq)
    diag = last_q // block_k
    causal = torch.arange(nkb, device=gen_device)[None, :] <= diag[:, None]
    score = torch.rand(B, H, nq, nkb, generator=generator, device=gen_device).masked_fill(~causal, -1.0)
    score[..., torch.arange(nq, device=gen_device), diag] = 2.0
    count = (causal.sum(-1) * keep).round().long().clamp(min=1).expand(B, H, nq).contiguous()
    width = int(count.max())
    index = score.topk(width, dim=-1, sorted=True).indices  # sorted: each row keeps its top `count`
    return index.to(torch.int32).to(device).contiguous(), count.to(torch.int32).to(device)


def kept_pairs(block_index: torch.Tensor, block_count: torch.Tensor, Tq: int, Tk: int, *, block_q: int,
               block_k: int) -> int:
    """Number of causal (query, key) pairs the block lists cover, computed block by block (no Tq x Tk mask)."""
    B, H, nq, width = block_index.shape
    valid = torch.arange(width, device=block_index.device) < block_count[..., None].long()
    j = torch.arange(nq, device=block_index.device).view(1, 1, nq, 1)
    q_lo = (Tk - Tq) + j * block_q
    q_hi = (Tk - Tq) + torch.clamp((j + 1) * block_q, max=Tq) - 1
    k_lo = block_index.long() * block_k
    k_hi = torch.clamp(k_lo + block_k, max=Tk) - 1
    total = 0
    for i in range(block_q):  # pairs for the i-th query row of every block: keys k_lo..min(k_hi, qpos)
        qpos = q_lo + i
        n = (torch.minimum(k_hi, qpos) - k_lo + 1).clamp(min=0) * (qpos <= q_hi)
        total += int((n * valid).sum())
    return total


class LargestTensorMode(TorchDispatchMode):
    """Records the largest tensor any aten op returns: allocation size measured from outside the code under test."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def counted_flops(fn) -> int:
    """FLOPs of the matmul-like ops run by ``fn()``, as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
