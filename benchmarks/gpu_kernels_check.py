"""Time-boxed GPU run: Triton kernel correctness first, then the CUDA benchmark table.

    python benchmarks/gpu_kernels_check.py --out "$OUT" --budget-s 480

Priority order: (1) correctness of each Triton kernel against reference.py on small awkward shapes
(bf16/fp16/fp32, head_dim 60/64/96/128, GQA 1/2/4, odd lengths, Tq < Tk, kv_start, empty rows, gradients of
linear_attn, gated_linear_attn and delta_rule_attn), (2) large-shape cross-checks Triton vs the PyTorch path,
(3) benchmarks/kernels.py rows, gated ops against flash-linear-attention's chunk kernels when fla imports
(most important first). Every result is written as soon as it exists: correctness.jsonl / correctness.md,
kernels-cuda.json / kernels-cuda.md, env.json. A failing check is recorded, never fatal.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from seqtool.kernels import (block_sparse_attn, decode_attn, delta_rule_attn, delta_rule_attn_step,  # noqa: E402
                             gated_linear_attn, gated_linear_attn_step, linear_attn, linear_attn_step,
                             vertical_slash_attn)
from seqtool.kernels.block_sparse.reference import masked_attention_reference, vertical_slash_mask  # noqa: E402
from seqtool.kernels.testing import random_block_pattern, rel_rms  # noqa: E402

DEV = "cuda"  # "cpu" only for a dry run of the checks under TRITON_INTERPRET=1
TOL = {torch.float32: 5e-3, torch.float16: 3e-3, torch.bfloat16: 2e-2}  # fp32 dots run as tf32 on GPU


class Log:
    def __init__(self, out: Path, deadline: float):
        self.out, self.deadline, self.rows = out, deadline, []
        out.mkdir(parents=True, exist_ok=True)

    def check(self, name: str, fn) -> None:
        if time.time() > self.deadline:
            return
        t0 = time.time()
        try:
            errs, tol = fn()
            row = {"check": name, "ok": all(e <= tol for e in errs.values()), "tol": tol,
                   "rel_rms": {k: float(f"{e:.3g}") for k, e in errs.items()}}
        except Exception as e:  # record and go on: one broken kernel must not hide the others
            row = {"check": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:300],
                   "trace": traceback.format_exc()[-1500:]}
        row["s"] = round(time.time() - t0, 2)
        self.rows.append(row)
        print(("PASS " if row["ok"] else "FAIL ") + name, row.get("rel_rms", row.get("error")), flush=True)
        with open(self.out / "correctness.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        lines = ["# GPU kernel correctness", "", "| check | ok | rel RMS (tol) | s |", "|---|---|---|---|"]
        for r in self.rows:
            detail = r.get("error") or ", ".join(f"{k} {v:g}" for k, v in r["rel_rms"].items()) + f" ({r['tol']:g})"
            lines.append(f"| {r['check']} | {'yes' if r['ok'] else 'NO'} | {detail} | {r['s']} |")
        (self.out / "correctness.md").write_text("\n".join(lines) + "\n")


def _qkv(B, Hq, Hkv, Tq, Tk, D, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return [torch.randn(B, h, t, D, device=DEV, generator=g).to(dtype) for h, t in ((Hq, Tq), (Hkv, Tk), (Hkv, Tk))]


def block_sparse_case(B, Hq, Hkv, Tq, Tk, D, dtype, bq, bk, keep, kv_start=None):
    def run():
        q, k, v = _qkv(B, Hq, Hkv, Tq, Tk, D, dtype)
        bi, bc = random_block_pattern(B, Hq, Tq, Tk, block_q=bq, block_k=bk, keep=keep, device=DEV,
                                      generator=torch.Generator().manual_seed(1))
        bc[0, 0, 0] = 0
        kvs = None if kv_start is None else torch.tensor(kv_start, device=DEV)
        kw = dict(block_q=bq, block_k=bk, kv_start=kvs, return_lse=True)
        o, l = block_sparse_attn(q, k, v, bi, bc, backend="triton", **kw)
        ro, rl = block_sparse_attn(q, k, v, bi, bc, backend="reference", **kw)
        to, tl_ = block_sparse_attn(q, k, v, bi, bc, backend="torch", **kw)
        return {"out": rel_rms(ro, o), "lse": rel_rms(rl, l), "torch_path_out": rel_rms(ro, to),
                "torch_path_lse": rel_rms(rl, tl_)}, TOL[dtype]
    return run


def full_blocks_vs_sdpa(T, D, dtype):
    def run():
        q, k, v = _qkv(1, 8, 2, T, T, D, dtype, seed=2)
        nq = -(-T // 64)
        bi = torch.arange(nq, device=DEV, dtype=torch.int32).expand(1, 8, nq, nq).contiguous()
        bc = (torch.arange(nq, device=DEV, dtype=torch.int32) + 1).expand(1, 8, nq).contiguous()
        o = block_sparse_attn(q, k, v, bi, bc, backend="triton")
        d = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(4, 1),
                                           v.float().repeat_interleave(4, 1), is_causal=True)
        return {"out_vs_sdpa": rel_rms(d, o)}, TOL[dtype]
    return run


def vertical_slash_case(dtype):
    def run():
        B, Hq, Hkv, Tq, Tk, D = 1, 4, 2, 300, 520, 128
        q, k, v = _qkv(B, Hq, Hkv, Tq, Tk, D, dtype, seed=3)
        g = torch.Generator().manual_seed(4)
        vi = torch.randint(0, Tk, (B, Hq, 20), generator=g)
        si = torch.randint(0, Tk, (B, Hq, 6), generator=g)
        si[..., 0] = 0
        o, l = vertical_slash_attn(q, k, v, vi.to(DEV), si.to(DEV), return_lse=True, backend="triton")
        ro, rl = masked_attention_reference(q, k, v, vertical_slash_mask(Tq, Tk, vi, si, block_q=64, block_k=64),
                                            D ** -0.5)
        return {"out": rel_rms(ro, o), "lse": rel_rms(rl, l)}, TOL[dtype]
    return run


def decode_case(B, Hq, Hkv, Tq, Tk, D, dtype, page_size, n_pages):
    def run():
        q, k, v = _qkv(B, Hq, Hkv, Tq, Tk, D, dtype, seed=5)
        npg = -(-Tk // page_size)
        g = torch.Generator().manual_seed(6)
        pages = torch.stack([torch.randperm(npg, generator=g)[:n_pages] for _ in range(B * Hkv)]).view(B, Hkv, -1)
        count = torch.randint(1, n_pages + 1, (B, Hkv), generator=g)
        kv_len = torch.tensor([Tk - 5 * b for b in range(B)], device=DEV)
        kv_start = torch.tensor([3 * b for b in range(B)], device=DEV)
        errs = {}
        for name, kw in (("dense", {}), ("kvlen_kvstart", dict(kv_len=kv_len, kv_start=kv_start)),
                         ("pages", dict(page_index=pages.to(DEV).int(), page_count=count.to(DEV).int(),
                                        kv_len=kv_len))):
            o, l = decode_attn(q, k, v, page_size=page_size, return_lse=True, backend="triton", **kw)
            ro, rl = decode_attn(q, k, v, page_size=page_size, return_lse=True, backend="reference", **kw)
            errs[name + "_out"], errs[name + "_lse"] = rel_rms(ro, o), rel_rms(rl, l)
        return errs, TOL[dtype]
    return run


def linear_case(B, Hq, Hkv, T, Dk, Dv, dtype, decay, chunk):
    def run():
        g = torch.Generator(device=DEV).manual_seed(7)
        q = (torch.randn(B, Hq, T, Dk, device=DEV, generator=g) / Dk ** 0.5).to(dtype).requires_grad_()
        k = (torch.randn(B, Hkv, T, Dk, device=DEV, generator=g) / Dk ** 0.5).to(dtype).requires_grad_()
        v = torch.randn(B, Hkv, T, Dv, device=DEV, generator=g).to(dtype).requires_grad_()
        s0 = torch.randn(B, Hq, Dk, Dv, device=DEV, generator=g).requires_grad_()
        lam = (0.9 + 0.1 * torch.rand(Hq, device=DEV, generator=g)) if decay else None
        res = {}
        for backend in ("triton", "reference"):
            o, s = linear_attn(q, k, v, decay=lam, chunk_size=chunk, initial_state=s0, output_final_state=True,
                               scale=0.5, backend=backend)
            wo = torch.randn(o.shape, device=DEV, generator=torch.Generator(device=DEV).manual_seed(8))
            ws = torch.randn(s.shape, device=DEV, generator=torch.Generator(device=DEV).manual_seed(9))
            grads = torch.autograd.grad((o.float() * wo).sum() + (s * ws).sum(), [q, k, v, s0])
            res[backend] = (o, s) + tuple(grads)
        names = ("out", "final_state", "dq", "dk", "dv", "ds0")
        errs = {n: rel_rms(r, t) for n, r, t in zip(names, res["reference"], res["triton"])}
        with torch.no_grad():
            o_step, _ = linear_attn_step(q[:, :, :4], k[:, :, :4], v[:, :, :4], s0, decay=lam, scale=0.5)
        errs["step_vs_chunked"] = rel_rms(res["triton"][0][:, :, :4], o_step)
        return errs, TOL[dtype] * 2
    return run


def gated_case(op, B, H, T, Dk, Dv, dtype, variant, chunk):
    """Triton and torch paths vs the reference: out, final state and every gradient; plus the decode step.

    op "gla": variant "head" (B, H, T) or "dim" (B, H, T, Dk) log-decay; op "delta": variant "gated" or "plain".
    """
    def run():
        g = torch.Generator(device=DEV).manual_seed(11)

        def rnd(*shape):
            return torch.randn(*shape, device=DEV, generator=g)

        q = (rnd(B, H, T, Dk) / Dk ** 0.5).to(dtype).requires_grad_()
        k = F.normalize(rnd(B, H, T, Dk), dim=-1).to(dtype).requires_grad_()
        v = rnd(B, H, T, Dv).to(dtype).requires_grad_()
        s0 = rnd(B, H, Dk, Dv).requires_grad_()
        ld = F.logsigmoid(rnd(*((B, H, T, Dk) if variant == "dim" else (B, H, T))) + 2).requires_grad_()
        beta = torch.sigmoid(rnd(B, H, T)).requires_grad_()
        if op == "gla":
            ins = [q, k, v, ld, s0]

            def call(backend):
                return gated_linear_attn(q, k, v, ld, chunk=chunk, initial_state=s0, return_state=True, scale=0.5,
                                         backend=backend)
        else:
            gate = ld if variant == "gated" else None
            ins = [q, k, v, beta, s0] + ([ld] if gate is not None else [])

            def call(backend):
                return delta_rule_attn(q, k, v, beta, log_decay=gate, chunk=chunk, initial_state=s0,
                                       return_state=True, scale=0.5, backend=backend)
        res = {}
        for backend in ("triton", "torch", "reference"):
            o, s = call(backend)
            wo = torch.randn(o.shape, device=DEV, generator=torch.Generator(device=DEV).manual_seed(8))
            ws = torch.randn(s.shape, device=DEV, generator=torch.Generator(device=DEV).manual_seed(9))
            res[backend] = (o, s) + tuple(torch.autograd.grad((o.float() * wo).sum() + (s * ws).sum(), ins))
        names = ("out", "final_state", "dq", "dk", "dv") + (("dlog_decay", "ds0") if op == "gla" else
                                                            ("dbeta", "ds0", "dlog_decay"))
        errs = {}
        for backend in ("triton", "torch"):
            errs.update({f"{backend}_{n}": rel_rms(r, t) for n, r, t in zip(names, res["reference"], res[backend])})
        with torch.no_grad():
            if op == "gla":
                o_step, _ = gated_linear_attn_step(q[:, :, :4], k[:, :, :4], v[:, :, :4], ld[:, :, :4], s0, scale=0.5)
            else:
                o_step, _ = delta_rule_attn_step(q[:, :, :4], k[:, :, :4], v[:, :, :4], beta[:, :, :4], s0,
                                                 log_decay=None if variant != "gated" else ld[:, :, :4], scale=0.5)
        errs["step_vs_chunked"] = rel_rms(res["triton"][0][:, :, :4], o_step)
        return errs, TOL[dtype] * 2
    return run


def gated_large_cross_check(T, dtype):
    """Triton vs the chunked PyTorch path (same GPU) at a length the reference loop is too slow for."""
    def run():
        g = torch.Generator(device=DEV).manual_seed(12)
        B, H, D = 1, 8, 128
        q = (torch.randn(B, H, T, D, device=DEV, generator=g) / D ** 0.5).to(dtype)
        k = F.normalize(torch.randn(B, H, T, D, device=DEV, generator=g), dim=-1).to(dtype)
        v = torch.randn(B, H, T, D, device=DEV, generator=g).to(dtype)
        ld = F.logsigmoid(torch.randn(B, H, T, device=DEV, generator=g) + 3)
        beta = torch.sigmoid(torch.randn(B, H, T, device=DEV, generator=g))
        errs = {}
        with torch.no_grad():
            for name, fn in (("gla", lambda b: gated_linear_attn(q, k, v, ld, backend=b)),
                             ("gated_delta", lambda b: delta_rule_attn(q, k, v, beta, log_decay=ld, backend=b))):
                errs[name] = rel_rms(fn("torch"), fn("triton"))
        return errs, TOL[dtype]
    return run


def large_cross_check(T, dtype):
    """Triton vs the PyTorch path at a size the reference cannot handle."""
    def run():
        q, k, v = _qkv(1, 32, 8, T, T, 128, dtype, seed=10)
        bi, bc = random_block_pattern(1, 32, T, T, block_q=64, block_k=64, keep=0.1, device=DEV)
        o, l = block_sparse_attn(q, k, v, bi, bc, return_lse=True, backend="triton")
        to, tl_ = block_sparse_attn(q, k, v, bi, bc, return_lse=True, backend="torch")
        pages = torch.randperm(T // 64, device=DEV)[: T // 1024].sort().values.int().expand(1, 8, -1).contiguous()
        d = decode_attn(q[:, :, -1:], k, v, page_index=pages, backend="triton")
        dt_ = decode_attn(q[:, :, -1:], k, v, page_index=pages, backend="torch")
        return {"bsa_out": rel_rms(to, o), "bsa_lse": rel_rms(tl_, l), "decode_pages": rel_rms(dt_, d)}, TOL[dtype]
    return run


def correctness(log: Log, large: bool = True) -> None:
    bf, fp, f32 = torch.bfloat16, torch.float16, torch.float32
    log.check("block_sparse bf16 D128 g4 T1000", block_sparse_case(1, 8, 2, 1000, 1000, 128, bf, 64, 64, 0.3))
    log.check("block_sparse fp16 D64 g2 Tq257<Tk1031 kv_start", block_sparse_case(2, 4, 2, 257, 1031, 64, fp, 64, 64,
                                                                                   0.5, (0, 40)))
    log.check("block_sparse fp32 D60 g1 T63 blocks 16x32", block_sparse_case(1, 2, 2, 63, 63, 60, f32, 16, 32, 0.7))
    log.check("block_sparse bf16 D96 g4 T777 bq128 bk64", block_sparse_case(1, 8, 2, 777, 777, 96, bf, 128, 64, 0.4))
    log.check("block_sparse full lists == sdpa bf16", full_blocks_vs_sdpa(1000, 128, bf))
    log.check("vertical_slash bf16 D128", vertical_slash_case(bf))
    log.check("decode bf16 D128 g4 Tq1 Tk5000", decode_case(2, 8, 2, 1, 5000, 128, bf, 64, 12))
    log.check("decode fp16 D64 g4 Tq16 Tk3001", decode_case(1, 8, 2, 16, 3001, 64, fp, 64, 9))
    log.check("decode fp32 D60 g1 Tq4 Tk700 page32", decode_case(2, 4, 4, 4, 700, 60, f32, 32, 5))
    log.check("linear fwd+bwd bf16 D128 g4 T300 decay", linear_case(1, 8, 2, 300, 128, 128, bf, True, 64))
    log.check("linear fwd+bwd fp32 D64 g1 T257 no decay", linear_case(2, 2, 2, 257, 64, 64, f32, False, 64))
    log.check("linear fwd+bwd fp16 Dk60 Dv96 g2 T129 decay", linear_case(1, 4, 2, 129, 60, 96, fp, True, 32))
    log.check("gla fwd+bwd fp32 D64 head decay B2 T63", gated_case("gla", 2, 2, 63, 64, 64, f32, "head", 16))
    log.check("gla fwd+bwd bf16 D128 per-dim decay T257", gated_case("gla", 1, 4, 257, 128, 128, bf, "dim", 64))
    log.check("gla fwd+bwd fp16 Dk60 Dv96 head decay T100", gated_case("gla", 1, 2, 100, 60, 96, fp, "head", 32))
    log.check("delta fwd+bwd fp32 D64 gated B2 T63", gated_case("delta", 2, 2, 63, 64, 64, f32, "gated", 16))
    log.check("delta fwd+bwd bf16 D128 gated T257", gated_case("delta", 1, 4, 257, 128, 128, bf, "gated", 64))
    log.check("delta fwd+bwd fp16 Dk60 Dv96 plain T100", gated_case("delta", 1, 2, 100, 60, 96, fp, "plain", 32))
    if large:
        log.check("large cross-check bf16 T16k (triton vs torch path)", large_cross_check(16384, bf))
        log.check("gated large cross-check bf16 T8k (triton vs torch path)", gated_large_cross_check(8192, bf))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "results" / "gpu"))
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting new work after this many seconds")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="run the small correctness checks on CPU under TRITON_INTERPRET=1 (tests this script)")
    args = ap.parse_args(argv)
    if args.dry_run_cpu:
        global DEV
        DEV = "cpu"
        os.environ["TRITON_INTERPRET"] = "1"
        log = Log(Path(args.out), time.time() + args.budget_s)
        correctness(log, large=False)
        return 1 if any(not r["ok"] for r in log.rows) else 0
    if not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: unset it so kernels compile for the GPU", file=sys.stderr)
        return 2
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import triton

    env = {"device": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
           "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (out / "env.json").write_text(json.dumps(env, indent=1))
    print(env, flush=True)
    log = Log(out, t0 + args.budget_s)
    correctness(log)
    print(f"correctness done in {time.time() - t0:.0f}s", flush=True)
    if not args.skip_bench:
        import kernels as bench

        timer = bench.Timer(torch.device("cuda"), reps=1)
        sink = bench.Sink(out / "kernels-cuda", bench._meta(torch.device("cuda"), 1))
        bench.run_cuda(sink, timer, t0 + args.budget_s, quick=False)
        sink.meta["wall_s"] = round(time.time() - t0, 1)
        sink.flush()
    failed = [r["check"] for r in log.rows if not r["ok"]]
    print(f"done in {time.time() - t0:.0f}s; failed checks: {failed or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
