"""Comparison helper shared by kernel tests and the GPU check script."""
from __future__ import annotations

import torch


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
