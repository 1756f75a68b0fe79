"""Kernel benchmarks: block-sparse prefill, split-KV / paged decode, chunked linear attention vs torch SDPA,
gated linear attention / (gated) delta rule: time per token vs length, and forward + backward vs SDPA.

One command:  python benchmarks/kernels.py            (CPU: PyTorch paths at small sizes; CUDA: Triton kernels
at Llama-3-8B attention shapes: 32 query heads, 8 KV heads, head_dim 128, bf16)
Writes benchmarks/results/kernels-<device>.{json,md}, rewritten after every row so a killed run keeps its rows.
Baselines and candidates are timed side by side in the same run (interleaved on CPU).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from seqtool.kernels import block_sparse_attn, decode_attn, delta_rule_attn, gated_linear_attn, linear_attn
from seqtool.kernels.testing import kept_pairs, random_block_pattern

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    op: str
    shape: str
    variant: str
    ms: float
    baseline: str = ""
    baseline_ms: float | None = None
    speedup: float | None = None
    sparsity: float | None = None
    tflops: float | None = None
    mem_mb: float | None = None
    note: str = ""


@dataclass
class Sink:
    """Collects rows; rewrites JSON + markdown after each one."""

    path_stem: Path
    meta: dict
    rows: list = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(_fmt_row(row), file=sys.stderr, flush=True)
        self.flush()

    def flush(self) -> None:
        self.path_stem.parent.mkdir(parents=True, exist_ok=True)
        data = {"meta": self.meta, "rows": [asdict(r) for r in self.rows]}
        self.path_stem.with_suffix(".json").write_text(json.dumps(data, indent=1))
        self.path_stem.with_suffix(".md").write_text(markdown(self.meta, self.rows))


def _num(x, fmt):
    return "" if x is None else format(x, fmt)


def _fmt_row(r: Row) -> str:
    return (f"{r.op:14s} {r.shape:28s} {r.variant:26s} {r.ms:10.3f} ms  base {_num(r.baseline_ms, '.3f'):>9s}"
            f"  x{_num(r.speedup, '.2f')}  {r.note}")


def markdown(meta: dict, rows: list) -> str:
    head = ["# Kernel benchmarks", "", "| key | value |", "|---|---|"]
    head += [f"| {k} | {v} |" for k, v in meta.items()]
    head += ["", "speedup = baseline_ms / ms (ratio = 1 / speedup). sparsity = 1 - kept / causal (query, key) pairs.",
             "", "| op | shape | variant | sparsity | ms | baseline | baseline ms | speedup | ratio | TFLOP/s |"
             " mem MB | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = None if not r.speedup else 1 / r.speedup
        head.append(f"| {r.op} | {r.shape} | {r.variant} | {_num(r.sparsity, '.3f')} | {r.ms:.3f} | {r.baseline} | "
                    f"{_num(r.baseline_ms, '.3f')} | {_num(r.speedup, '.2f')} | {_num(ratio, '.3f')} | "
                    f"{_num(r.tflops, '.3g')} | {_num(r.mem_mb, '.0f')} | {r.note} |")
    return "\n".join(head) + "\n"


class Timer:
    """CUDA: triton's do_bench (median). CPU: best of `reps` interleaved rounds, because the CPU runs share
    their cores with other jobs and the slow tail measures the neighbours, not the kernel."""

    def __init__(self, device: torch.device, reps: int):
        self.device, self.reps = device, reps

    def measure(self, fns: dict, stat: str = "min") -> dict:
        """Seconds per call of each fn; stat ("min" or "median") picks among the CPU rounds."""
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return {name: do_bench(fn, warmup=25, rep=100) / 1e3 for name, fn in fns.items()}
        times = {name: [] for name in fns}
        for fn in fns.values():  # warm-up round (allocator, thread pool)
            fn()
        for _ in range(self.reps):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        if stat == "median":
            return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
        return {name: min(ts) for name, ts in times.items()}


def _peak_mb(device, fn) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _shape(B, Hq, Hkv, T, D, dtype, extra=""):
    return f"B{B} H{Hq}/{Hkv} T{T // 1024}k D{D} {str(dtype).replace('torch.', '')}{extra}"


def _fits(device, nbytes: float) -> bool:
    if device.type != "cuda":
        return nbytes < 8 * 2**30
    free, _ = torch.cuda.mem_get_info()
    return nbytes < 0.8 * free


def bench_block_sparse(sink, timer, device, dtype, B, Hq, Hkv, D, T, sparsities, block=64):
    """Causal SDPA vs block_sparse_attn at several sparsities (random block lists with the diagonal)."""
    esz = torch.finfo(dtype).bits // 8
    if not _fits(device, 6 * B * Hq * T * D * esz):
        sink.add(Row("block_sparse", _shape(B, Hq, Hkv, T, D, dtype), "skipped", float("nan"), note="does not fit"))
        return
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, Hq, T, D, device=device, dtype=dtype, generator=gen)
    k = torch.randn(B, Hkv, T, D, device=device, dtype=dtype, generator=gen)
    v = torch.randn(B, Hkv, T, D, device=device, dtype=dtype, generator=gen)
    causal_pairs = B * Hq * T * (T + 1) // 2
    g = Hq // Hkv
    # SDPA needs repeated K/V for GQA on every backend we compare against; repeat once outside the timing.
    kr, vr = (k, v) if g == 1 else (k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))

    def sdpa():
        return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)

    fns, pats = {"sdpa": sdpa}, {}
    for s in sparsities:
        bi, bc = random_block_pattern(B, Hq, T, T, block_q=block, block_k=block, keep=1 - s, device=device,
                                      generator=torch.Generator(device=device).manual_seed(1))
        pats[s] = (bi, bc, kept_pairs(bi, bc, T, T, block_q=block, block_k=block))
        fns[f"bsa{s}"] = (lambda bi=bi, bc=bc: block_sparse_attn(q, k, v, bi, bc, block_q=block, block_k=block))
    with torch.no_grad():
        times = timer.measure(fns)
        mem_sdpa = _peak_mb(device, sdpa)
        mems = {s: _peak_mb(device, fns[f"bsa{s}"]) for s in sparsities}
    shape = _shape(B, Hq, Hkv, T, D, dtype)
    sink.add(Row("block_sparse", shape, "sdpa causal", times["sdpa"] * 1e3, sparsity=0.0,
                 tflops=4 * D * causal_pairs / times["sdpa"] / 1e12, mem_mb=mem_sdpa))
    for s in sparsities:
        t = times[f"bsa{s}"]
        kept = pats[s][2]
        sink.add(Row("block_sparse", shape, f"block_sparse {int(s * 100)}%", t * 1e3, "sdpa causal",
                     times["sdpa"] * 1e3, times["sdpa"] / t, 1 - kept / causal_pairs, 4 * D * kept / t / 1e12,
                     mems[s], note=f"block {block}"))


def quest_select(q, kmin, kmax, n_pages, valid_pages):
    """Quest page scores (upper bound of q.k per page, summed over a KV group's query heads) -> top pages.

    q (B, Hq, 1, D); kmin/kmax (B, Hkv, P, D) per-page channel min/max. Returns page_index (B, Hkv, n) int32.
    """
    B, Hq, _, D = q.shape
    Hkv = kmin.shape[1]
    qg = q.view(B, Hkv, Hq // Hkv, D).float()
    # sum_d max(q_d * max_d, q_d * min_d), summed over the group's heads
    score = (torch.maximum(qg[:, :, :, None, :] * kmax[:, :, None].float(),
                           qg[:, :, :, None, :] * kmin[:, :, None].float())).sum(-1).sum(2)
    score[..., valid_pages:] = float("-inf")
    return score.topk(n_pages, dim=-1).indices.to(torch.int32)


def bench_decode(sink, timer, device, dtype, B, Hq, Hkv, D, T, page_frac, page_size=64):
    """Dense decode (1 query) via SDPA vs decode_attn (split-KV), and with top-k pages (Quest selection)."""
    esz = torch.finfo(dtype).bits // 8
    g = Hq // Hkv
    if not _fits(device, 2 * B * Hkv * T * D * esz * 1.2):
        sink.add(Row("decode", _shape(B, Hq, Hkv, T, D, dtype), "skipped", float("nan"), note="does not fit"))
        return
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, Hq, 1, D, device=device, dtype=dtype, generator=gen)
    k = torch.randn(B, Hkv, T, D, device=device, dtype=dtype, generator=gen)
    v = torch.randn(B, Hkv, T, D, device=device, dtype=dtype, generator=gen)
    npg = T // page_size
    n_sel = max(1, int(npg * page_frac))
    kp = k.view(B, Hkv, npg, page_size, D)
    kmin, kmax = kp.amin(3), kp.amax(3)  # page metadata, maintained as pages fill; not timed
    pages = quest_select(q, kmin, kmax, n_sel, npg)
    fns = {}
    repeated = g > 1 and _fits(device, 2 * B * Hq * T * D * esz * 1.2)
    if repeated:
        kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        fns["sdpa"] = lambda: F.scaled_dot_product_attention(q, kr, vr)
    elif g == 1:
        fns["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v)
    if g > 1:
        fns["sdpa_gqa"] = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    fns["decode"] = lambda: decode_attn(q, k, v)
    fns["pages"] = lambda: decode_attn(q, k, v, page_index=pages, page_size=page_size)
    fns["quest"] = lambda: decode_attn(q, k, v, page_index=quest_select(q, kmin, kmax, n_sel, npg),
                                       page_size=page_size)
    with torch.no_grad():
        times = timer.measure(fns)
    base_name = min((n for n in ("sdpa", "sdpa_gqa") if n in times), key=lambda n: times[n])
    base = times[base_name]
    shape = _shape(B, Hq, Hkv, T, D, dtype)
    for name in ("sdpa", "sdpa_gqa"):
        if name in times:
            sink.add(Row("decode", shape, name.replace("_", " ") + (" (k/v repeated)" if name == "sdpa" and g > 1
                                                                       else ""), times[name] * 1e3))
    bytes_dense = 2 * B * Hkv * T * D * esz
    sink.add(Row("decode", shape, "decode_attn dense", times["decode"] * 1e3, base_name, base * 1e3,
                 base / times["decode"], note=f"{bytes_dense / times['decode'] / 1e9:.0f} GB/s of K/V"))
    frac = f"{n_sel}/{npg} pages of {page_size}"
    sink.add(Row("decode", shape, "decode_attn top-k pages", times["pages"] * 1e3, base_name, base * 1e3,
                 base / times["pages"], sparsity=1 - n_sel / npg, note=frac + ", selection not timed"))
    sink.add(Row("decode", shape, "Quest select + pages", times["quest"] * 1e3, base_name, base * 1e3,
                 base / times["quest"], sparsity=1 - n_sel / npg, note=frac + ", selection timed"))


def bench_linear(sink, timer, device, dtype, B, H, D, T, chunk=64, with_sdpa=True):
    """Chunked linear attention (with per-head decay) vs causal SDPA; reports time per token."""
    esz = torch.finfo(dtype).bits // 8
    if not _fits(device, 8 * B * H * T * D * esz + B * H * (T // chunk) * D * D * 4):
        sink.add(Row("linear", _shape(B, H, H, T, D, dtype), "skipped", float("nan"), note="does not fit"))
        return
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=gen) / math.sqrt(D) for _ in range(3))
    decay = 1 - torch.exp(-torch.linspace(2, 8, H, device=device))
    fns = {"linear": lambda: linear_attn(q, k, v, decay=decay, chunk_size=chunk)}
    if with_sdpa:
        fns["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with torch.no_grad():
        times = timer.measure(fns)
        mem = _peak_mb(device, fns["linear"])
    shape = _shape(B, H, H, T, D, dtype)
    t = times["linear"]
    base = times.get("sdpa")
    sink.add(Row("linear", shape, "linear_attn fwd (decay)", t * 1e3, "sdpa causal" if base else "",
                 None if base is None else base * 1e3, None if base is None else base / t, mem_mb=mem,
                 note=f"{t / T * 1e9:.1f} ns/token"))


def _gated_inputs(device, dtype, B, H, D, T, *, grad=False, seed=0) -> dict:
    """Unit-norm keys, slow-ish decays (logsigmoid(N(3, 1))), beta = sigmoid(N(0, 1)): a Gated DeltaNet regime."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, device=device, generator=gen)

    x = {"q": rnd(B, H, T, D) / math.sqrt(D), "k": F.normalize(rnd(B, H, T, D), dim=-1), "v": rnd(B, H, T, D),
         "g": F.logsigmoid(rnd(B, H, T) + 3), "gd": F.logsigmoid(rnd(B, H, T, D) + 3),
         "beta": torch.sigmoid(rnd(B, H, T))}
    for n in ("q", "k", "v"):
        x[n] = x[n].to(dtype)
    if grad:
        for t in x.values():
            t.requires_grad_()
    return x


# name -> (call, the inputs it differentiates)
GATED_OPS = {
    "gla head decay": (lambda x: gated_linear_attn(x["q"], x["k"], x["v"], x["g"]), ("q", "k", "v", "g")),
    "gla per-dim decay": (lambda x: gated_linear_attn(x["q"], x["k"], x["v"], x["gd"]), ("q", "k", "v", "gd")),
    "gated delta rule": (lambda x: delta_rule_attn(x["q"], x["k"], x["v"], x["beta"], log_decay=x["g"]),
                         ("q", "k", "v", "beta", "g")),
}


def _fla_ops() -> dict:
    """flash-linear-attention's chunk kernels (GPU only) in their (B, T, H, D) layout, when fla imports."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:  # not installed, or an incompatible version
        return {}

    def t(x, n):
        return x[n + "_bthd"]

    return {
        "fla chunk_simple_gla": (lambda x: chunk_simple_gla(q=t(x, "q"), k=t(x, "k"), v=t(x, "v"), g=t(x, "g"),
                                                            scale=1.0)[0], ("q", "k", "v", "g")),
        "fla chunk_gla": (lambda x: chunk_gla(q=t(x, "q"), k=t(x, "k"), v=t(x, "v"), g=t(x, "gd"), scale=1.0)[0],
                          ("q", "k", "v", "gd")),
        "fla chunk_gated_delta_rule": (lambda x: chunk_gated_delta_rule(
            q=t(x, "q"), k=t(x, "k"), v=t(x, "v"), g=t(x, "g"), beta=t(x, "beta"), scale=1.0)[0],
            ("q", "k", "v", "beta", "g")),
    }


def _to_bthd(x: dict) -> None:
    """Adds fla-layout leaf copies (B, T, H, ...) of every input, made outside the timing."""
    for n in list(x):
        t = x[n].detach().transpose(1, 2).contiguous()
        x[n + "_bthd"] = t.requires_grad_(x[n].requires_grad)


def bench_gated_scaling(sink, timer, device, dtype, B, H, D, Ts, ops=tuple(GATED_OPS)):
    """Chunked forward of the gated ops: time per token vs length; all lengths timed interleaved, medians."""
    for name in ops:
        call = GATED_OPS[name][0]
        inputs = {T: _gated_inputs(device, dtype, B, H, D, T) for T in Ts}
        fns = {T: (lambda x=inputs[T]: call(x)) for T in Ts}
        with torch.no_grad():
            times = timer.measure(fns, stat="median")
        base, prev = times[Ts[0]] / Ts[0], None
        for T in Ts:
            per = times[T] / T
            note = f"{per * 1e9:.0f} ns/token; per token x{per / base:.2f} vs T{Ts[0] // 1024}k"
            if prev is not None:
                note += f", x{per / prev:.2f} vs previous length"
            sink.add(Row("gated_scaling", _shape(B, H, H, T, D, dtype), f"{name} fwd", times[T] * 1e3, note=note))
            prev = per
        del inputs, fns


def bench_gated_train(sink, timer, device, dtype, B, H, D, T, with_fla=False):
    """Forward + backward (all input gradients) of the gated ops vs causal SDPA forward + backward, same B, H, D."""
    x = _gated_inputs(device, dtype, B, H, D, T, grad=True)
    gen = torch.Generator(device=device).manual_seed(1)
    do = torch.randn(B, H, T, D, device=device, generator=gen).to(dtype)
    ops = dict(GATED_OPS)
    if with_fla:
        fla = _fla_ops()
        if fla:
            _to_bthd(x)
            x["do_bthd"] = do.transpose(1, 2).contiguous()
            ops.update(fla)
        else:
            sink.add(Row("gated_train", _shape(B, H, H, T, D, dtype), "fla", float("nan"),
                         note="flash-linear-attention not importable here: no fla rows"))

    def fwd_bwd(call, names, fla_layout):
        def run():
            out = call(x)
            ins = [x[n + "_bthd"] if fla_layout else x[n] for n in names]
            return torch.autograd.grad(out, ins, x["do_bthd"] if fla_layout else do)
        return run

    def sdpa():
        out = F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)
        return torch.autograd.grad(out, [x["q"], x["k"], x["v"]], do)

    fns = {"sdpa": sdpa}
    fns.update({name: fwd_bwd(call, names, name.startswith("fla")) for name, (call, names) in ops.items()})
    times = {}
    try:
        times = timer.measure(fns, stat="median")
    except Exception as e:  # an fla kernel that fails here must not hide our rows: retry without fla
        sink.add(Row("gated_train", _shape(B, H, H, T, D, dtype), "fla", float("nan"),
                     note=f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"))
        times = timer.measure({n: f for n, f in fns.items() if not n.startswith("fla")}, stat="median")
    shape = _shape(B, H, H, T, D, dtype)
    base = times["sdpa"]
    sink.add(Row("gated_train", shape, "sdpa causal fwd+bwd", base * 1e3))
    for name in fns:
        if name != "sdpa" and name in times:
            t = times[name]
            sink.add(Row("gated_train", shape, f"{name} fwd+bwd", t * 1e3, "sdpa causal", base * 1e3, base / t,
                         note=f"{t / T * 1e9:.0f} ns/token"))


def _meta(device, reps):
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "reps": reps,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if device.type == "cpu":
        meta["timing"] = f"best of {reps} interleaved rounds (baseline and candidates alternate)"
        meta["load_avg_at_start"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    return meta


def run_cpu(sink, timer, quick: bool):
    dev, dt = torch.device("cpu"), torch.float32
    sp = [0.5, 0.8, 0.9, 0.95]
    for T in ([4096] if quick else [4096, 8192, 16384]):
        bench_block_sparse(sink, timer, dev, dt, 1, 8, 8, 64, T, sp)
    for T in ([16384] if quick else [16384, 65536]):
        for B in (1, 4):
            bench_decode(sink, timer, dev, dt, B, 8, 2, 64, T, page_frac=1 / 16)
    for T in ([4096] if quick else [4096, 16384]):
        bench_linear(sink, timer, dev, dt, 1, 8, 64, T)
    run_cpu_gated(sink, timer, quick)


def run_cpu_gated(sink, timer, quick: bool):
    """The gated-kernel rows alone (``--only gated``): B1 H8 D64 fp32."""
    dev, dt = torch.device("cpu"), torch.float32
    sink.meta["timing_gated"] = f"gated rows: median of {timer.reps} interleaved rounds"
    Ts = [1024, 4096, 16384] if quick else [1024, 2048, 4096, 8192, 16384]
    bench_gated_scaling(sink, timer, dev, dt, 1, 8, 64, Ts)
    bench_gated_train(sink, timer, dev, dt, 1, 8, 64, 4096)


def run_cuda(sink, timer, deadline: float, quick: bool):
    """Llama-3-8B attention shapes, most important rows first; stops starting new rows after the deadline."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    jobs = [
        lambda: bench_block_sparse(sink, timer, dev, dt, 1, 32, 8, 128, 131072, [0.9]),
        lambda: bench_decode(sink, timer, dev, dt, 1, 32, 8, 128, 131072, page_frac=1 / 16),
        lambda: bench_linear(sink, timer, dev, dt, 1, 32, 128, 32768),
        lambda: bench_linear(sink, timer, dev, dt, 1, 32, 128, 8192),
        lambda: bench_linear(sink, timer, dev, dt, 1, 32, 128, 131072, with_sdpa=False),
        lambda: bench_gated_train(sink, timer, dev, dt, 1, 32, 128, 8192, with_fla=True),
        lambda: bench_gated_scaling(sink, timer, dev, dt, 1, 32, 128, [4096, 8192, 16384, 32768]),
    ]
    if not quick:
        jobs += [lambda T=T: bench_block_sparse(sink, timer, dev, dt, 1, 32, 8, 128, T, [0.5, 0.8, 0.9, 0.95])
                 for T in (8192, 32768, 131072)]
        jobs += [lambda T=T, B=B: bench_decode(sink, timer, dev, dt, B, 32, 8, 128, T, page_frac=1 / 16)
                 for T in (32768, 262144) for B in (1, 8)]
        jobs += [lambda: bench_decode(sink, timer, dev, dt, 8, 32, 8, 128, 131072, page_frac=1 / 16)]
    for job in jobs:
        if time.time() > deadline:
            sink.meta["stopped_early"] = "time budget reached"
            sink.flush()
            break
        try:
            job()
        except Exception as e:  # e.g. out of memory: record the row as failed and go on with the others
            sink.add(Row("error", "", type(e).__name__, float("nan"), note=str(e).splitlines()[0][:120]))
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", default=str(RESULTS), help="results directory")
    ap.add_argument("--reps", type=int, default=5, help="timed rounds per measurement on CPU")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new rows after this many seconds")
    ap.add_argument("--quick", action="store_true", help="only the most important rows")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs only)")
    ap.add_argument("--only", choices=["all", "gated"], default="all",
                    help="gated: only the gated linear attention / delta rule rows (CPU; kernels-cpu-gated.*)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    timer = Timer(device, args.reps)
    suffix = "-gated" if args.only == "gated" else ""
    sink = Sink(Path(args.out) / f"kernels-{device.type}{suffix}", _meta(device, args.reps))
    t0 = time.time()
    if args.only == "gated" and device.type == "cpu":
        sink.meta.pop("timing", None)  # these rows keep medians (timing_gated), not the best round
        run_cpu_gated(sink, timer, args.quick)
    elif device.type == "cuda":
        run_cuda(sink, timer, t0 + args.budget_s, args.quick)
    else:
        run_cpu(sink, timer, args.quick)
    sink.meta["wall_s"] = round(time.time() - t0, 1)
    sink.flush()
    print(sink.path_stem.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
