"""Check ``official.keep_mask`` against the official sparse attention kernel (random inputs, small sizes).

Runs the official ``calc_prob_return_context`` (``v1_0/attention1_block_gpu_kernel``, under the Triton interpreter;
its autotuner needs a GPU driver, so the bare ``@triton.jit`` kernel under it runs with the default launch
options) on the ``(indices, ks)`` of ``official.official_select`` and compares its output with masked dense
attention over ``keep_mask``. A max |Δ| near float32 round-off means ``keep_mask`` is the set the kernel attends.

    TRITON_INTERPRET=1 python benchmarks/peers/hip/check_keep.py --official /tmp/hip-official
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import official  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--mask-k", type=int, default=64)
    args = ap.parse_args()
    official.load(args.official)
    from hip_attn.v1_0.attention1_block_gpu_kernel import calc_prob_return_context as C

    kernel = C._calc_prob_return_context_compute
    C._calc_prob_return_context_compute = getattr(kernel, "fn", kernel)  # skip the autotuner
    torch.manual_seed(0)
    h, t, d = 2, args.seq_len, 32
    q, k, v = torch.randn(h, t, d), torch.randn(h, t, d), torch.randn(h, t, d)
    k[:, 100:104] += 2 * q[:, -1:]  # something for the tree to find
    scale = d ** -0.5
    worst = 0.0
    for tq in (t, 1):
        qq = q[:, -tq:] * scale
        indices, ks, p = official.official_select(qq, k, v, args.mask_k, dense_queries_exp=0)
        keep = official.keep_mask(indices, ks, tq, t, p)
        ctx = C.calc_prob_return_context(qq, k, v, None, indices, ks, KV_REPEAT_INTERLEAVE=1,
                                         BLOCK_SIZE_Q=p["block_size_q"], BLOCK_SIZE_K=p["block_size_k"],
                                         IS_CAUSAL=True, USING_SLIDING_WINDOW=True,
                                         SLIDING_WINDOW_SIZE=p["sliding_window_size"])
        s = (qq @ k.transpose(-1, -2)).masked_fill(~keep, float("-inf"))
        ref = torch.softmax(s, -1) @ v
        err = float((ctx - ref).abs().max())
        worst = max(worst, err)
        print(f"Tq={tq}: kept keys per query {keep.sum(-1).float().mean():.1f} of {t}, max |official - masked "
              f"dense| = {err:.2e}", flush=True)
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
