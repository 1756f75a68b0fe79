"""``seqtool.profile``: latency, memory, KV-cache bytes and FLOPs of a model over one or more lengths."""
from __future__ import annotations

import gc
import math
import platform
import sys
from typing import Callable

import torch

from seqtool.arch.io import DTYPE_NAMES, load_model, resolve_device, resolve_dtype
from seqtool.arch.registry import get_family
from seqtool.errors import BadInputError, NotImplementedMethodError, SeqtoolError
from seqtool.profile import estimate as est
from seqtool.profile.flops import achieved_tflops, flop_shape, prefill_flops
from seqtool.profile.kvcache import analytic_kv_bytes
from seqtool.profile.measure import measure_length
from seqtool.profile.memory import is_oom_error, run_in_subprocess
from seqtool.profile.results import (ERROR, OOM, SKIPPED, ComparisonRow, Environment, LengthResult, ModelProfile,
                                     ProfileReport)
from seqtool.utils import format_bytes, parse_length, parse_length_list

DEFAULT_SEQ_LEN = 2048
Progress = Callable[[str, LengthResult], None]
# on_start(source, seq_len, estimated seconds, estimated memory bytes), before a length is measured
OnStart = Callable[[str, int, float, int], None]


def _validate(seq_len, sweep, batch, decode_tokens, warmup, repeats) -> list[int]:
    if seq_len is not None and sweep is not None:
        raise BadInputError("pass either --seq-len or --sweep, not both")
    if sweep is not None:
        lengths = parse_length_list(sweep) if isinstance(sweep, str) else [parse_length(x) for x in sweep]
    else:
        lengths = [parse_length(seq_len if seq_len is not None else DEFAULT_SEQ_LEN)]
    for name, value, low in (("--batch", batch, 1), ("--decode-tokens", decode_tokens, 0),
                             ("--warmup", warmup, 0), ("--repeats", repeats, 1)):
        if not isinstance(value, int) or value < low:
            raise BadInputError(f"{name} must be an integer >= {low}, got {value}")
    return lengths


def _check_attn(attn: str | None) -> None:
    if attn in (None, "sdpa", "eager"):
        return
    import importlib

    try:
        patches = importlib.import_module("seqtool.patches")
    except ImportError:
        patches = None
    if patches is None or not hasattr(patches, "apply_attn_spec"):
        raise NotImplementedMethodError(f"--attn {attn}: seqtool attention patches are not available; use sdpa or eager")


def _effective_dtype(source: str, dtype: str, device: torch.device) -> torch.dtype | None:
    """The dtype ``load_model`` will pick, or None to read it from the loaded model."""
    from seqtool.zoo import presets

    chosen = resolve_dtype(dtype)
    if chosen is not None:
        return chosen
    if presets.is_preset(source) and source != "ref":
        return presets.default_preset_dtype(source)
    return torch.float32 if device.type == "cpu" else None


def environment(device: torch.device) -> Environment:
    import transformers

    from seqtool.version import __version__

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return Environment(device_type=device.type, device_name=name, torch_version=torch.__version__,
                       transformers_version=transformers.__version__, seqtool_version=__version__,
                       python_version=sys.version.split()[0], platform=platform.platform(),
                       threads=torch.get_num_threads(), cuda_version=torch.version.cuda)


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _ratio(a, b) -> float | None:
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or a == 0:
        return None
    return b / a


def compare_rows(base: ModelProfile, other: ModelProfile) -> list[ComparisonRow]:
    """``other / base`` per length present in both."""
    by_len = {r.seq_len: r for r in other.rows}
    rows = []
    for a in base.rows:
        b = by_len.get(a.seq_len)
        if b is None:
            continue
        rows.append(ComparisonRow(
            seq_len=a.seq_len, prefill_ratio=_ratio(a.prefill_median_s, b.prefill_median_s),
            ttft_ratio=_ratio(a.ttft_s, b.ttft_s), decode_ratio=_ratio(a.decode_s_per_token, b.decode_s_per_token),
            peak_memory_ratio=_ratio(a.peak_memory_bytes, b.peak_memory_bytes),
            kv_cache_ratio=_ratio(a.kv_cache_bytes, b.kv_cache_bytes)))
    return rows


class _Profiler:
    """Profiles one model over the lengths (in process, or one subprocess per length)."""

    def __init__(self, source: str, settings: dict, device: torch.device, *, isolate: bool, check_memory: bool,
                 clock, progress: Progress | None, on_start: OnStart | None = None, max_seconds: float | None = None):
        self.source, self.s, self.device = source, settings, device
        self.isolate, self.check_memory, self.clock, self.progress = isolate, check_memory, clock, progress
        self.on_start, self.max_seconds = on_start, max_seconds
        dtype = _effective_dtype(source, settings["dtype"], device)
        if isolate:
            # shapes only: the subprocesses load the weights
            self.model = load_model(source, dtype=dtype or settings["dtype"], device="cpu", meta=True,
                                    apply_recipe=False).model
        else:
            self.model = load_model(source, dtype=dtype or settings["dtype"], device=str(device),
                                    attn=settings["attn"]).model
        self.dtype = next(self.model.parameters()).dtype
        self.config = self.model.config
        self.shape = flop_shape(self.model)
        params = list(self.model.parameters())
        self.weight_bytes = sum(p.numel() * p.element_size() for p in params)
        self.info = ModelProfile(
            source=source, family=get_family(self.model).family, params=sum(p.numel() for p in params),
            weight_bytes=self.weight_bytes, dtype=DTYPE_NAMES.get(self.dtype, str(self.dtype)), device=str(device),
            attn=settings["attn"] or str(getattr(self.config, "_attn_implementation", None) or "sdpa"))
        self.rate = est.matmul_flops_per_s(device, self.dtype)

    def run(self, lengths: list[int]) -> ModelProfile:
        for seq_len in lengths:
            row = self._one(seq_len)
            self._derive(row)
            self.info.rows.append(row)
            if self.progress is not None:
                self.progress(self.source, row)
        return self.info

    def _one(self, seq_len: int) -> LengthResult:
        s = self.s
        bpe = self.dtype.itemsize
        estimate = est.estimate_memory(self.config, weight_bytes=self.weight_bytes, bytes_per_element=bpe,
                                       batch=s["batch"], seq_len=seq_len, decode_tokens=s["decode_tokens"],
                                       attn=self.info.attn)
        if self.check_memory:
            available = est.available_bytes(self.device)
            overhead = est.CPU_RUNTIME_OVERHEAD if self.isolate and self.device.type == "cpu" else 0
            ok, needed = est.fits(estimate, available, weights_loaded=not self.isolate, overhead=overhead)
            if not ok:
                return LengthResult(seq_len, s["batch"], status=SKIPPED,
                                    note=f"needs ~{format_bytes(needed)} (estimate), {format_bytes(available)} "
                                         f"available on {self.device.type}: not run",
                                    estimated_memory_bytes=estimate.total, available_memory_bytes=available)
        seconds = est.estimate_seconds(prefill_flops(self.shape, s["batch"], seq_len), self.info.params,
                                       batch=s["batch"], decode_tokens=s["decode_tokens"], warmup=s["warmup"],
                                       repeats=s["repeats"], flops_per_s=self.rate)
        if self.max_seconds is not None and seconds > self.max_seconds:
            return LengthResult(seq_len, s["batch"], status=SKIPPED,
                                note=f"estimated ~{seconds:.3g} s > --max-seconds {self.max_seconds:g}: not run",
                                estimated_memory_bytes=estimate.total, estimated_seconds=float(f"{seconds:.3g}"))
        if self.on_start is not None:
            self.on_start(self.source, seq_len, seconds, estimate.total)
        row = self._measure_isolated(seq_len) if self.isolate else self._measure_here(seq_len)
        row.estimated_memory_bytes = estimate.total
        row.estimated_seconds = float(f"{seconds:.3g}")
        return row

    def _measure_here(self, seq_len: int) -> LengthResult:
        s = self.s
        try:
            fields = measure_length(self.model, seq_len=seq_len, batch=s["batch"], decode_tokens=s["decode_tokens"],
                                    warmup=s["warmup"], repeats=s["repeats"], breakdown=s["breakdown"],
                                    clock=self.clock)
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            note = str(exc).splitlines()[0][:160]
        else:
            return LengthResult(**fields)
        # outside the except block: the traceback (and the tensors its frames hold) is gone now
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return LengthResult(seq_len, s["batch"], status=OOM, note=note)

    def _measure_isolated(self, seq_len: int) -> LengthResult:
        s = self.s
        spec = dict(source=self.source, dtype=DTYPE_NAMES.get(self.dtype, s["dtype"]), device=str(self.device),
                    attn=s["attn"], seq_len=seq_len, batch=s["batch"], decode_tokens=s["decode_tokens"],
                    warmup=s["warmup"], repeats=s["repeats"], breakdown=s["breakdown"],
                    threads=torch.get_num_threads())
        outcome = run_in_subprocess(spec)
        result = outcome.result or {}
        if "row" in result:
            return LengthResult(**result["row"])
        if outcome.oom or "oom" in result:
            why = result.get("oom") or f"measurement process killed (exit {outcome.returncode}), likely out of memory"
            return LengthResult(seq_len, s["batch"], status=OOM, note=why)
        if "error" in result:
            import seqtool.errors as errors

            cls = getattr(errors, result["error"]["type"], SeqtoolError)
            raise cls(result["error"]["message"])
        last = (outcome.stderr_tail.strip().splitlines() or ["no output"])[-1][:200]
        return LengthResult(seq_len, s["batch"], status=ERROR,
                            note=f"measurement process failed (exit {outcome.returncode}): {last}")

    def _derive(self, row: LengthResult) -> None:
        row.kv_cache_bytes_dense = analytic_kv_bytes(self.config, tokens=row.seq_len, batch=row.batch,
                                                     bytes_per_element=self.dtype.itemsize)
        row.prefill_flops = prefill_flops(self.shape, row.batch, row.seq_len)
        if row.prefill_median_s is not None:
            row.prefill_tflops = achieved_tflops(row.prefill_flops, row.prefill_median_s)


def profile_model(source: str, *, seq_len: int | str | None = None, sweep: str | list | None = None,
                  batch: int = 1, decode_tokens: int = 32, dtype: str = "auto", device: str = "auto",
                  warmup: int = 1, repeats: int = 3, attn: str | None = None, breakdown: bool = False,
                  compare: str | None = None, threads: int | None = None, isolate: bool | None = None,
                  check_memory: bool = True,
                  clock: Callable[[], float] | None = None, progress: Progress | None = None,
                  max_seconds: float | None = None, on_start: OnStart | None = None) -> ProfileReport:
    """Profile ``source`` (and ``compare``, with ratios) at ``seq_len`` or each length of ``sweep``.

    Per length: prefill median/p90, time to first token, cached decode s/token and tokens/s, peak memory,
    KV-cache bytes from the real cache tensors, prefill FLOPs and TFLOP/s (see :mod:`seqtool.profile.flops`).
    ``threads`` sets torch's CPU threads for the measurement (restored afterwards); ``isolate`` (default: on
    CPU) runs each length in a fresh subprocess; ``clock`` replaces
    ``time.perf_counter`` (in-process only); ``progress(source, row)`` is called after every row.
    Lengths that run out of memory give an ``oom`` row; lengths estimated not to fit, or (``max_seconds``) to
    take longer than that, give a ``skipped`` row. ``on_start(source, seq_len, seconds, bytes)`` is called
    with the estimates before each length is measured. A measurement that fails gives an ``error`` row
    (the CLI then exits 1).
    """
    lengths = _validate(seq_len, sweep, batch, decode_tokens, warmup, repeats)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise BadInputError(f"--threads must be an integer >= 1, got {threads}")
    resolve_dtype(dtype)
    target = resolve_device(device)
    _check_attn(attn)
    if max_seconds is not None and not max_seconds > 0:
        raise BadInputError(f"--max-seconds must be positive, got {max_seconds}")
    isolate = target.type == "cpu" if isolate is None else isolate
    if isolate and clock is not None:
        raise BadInputError("an injected clock only works in-process (isolate=False)")
    settings = dict(lengths=lengths, batch=batch, decode_tokens=decode_tokens, dtype=dtype, device=str(target),
                    warmup=warmup, repeats=repeats, attn=attn, breakdown=breakdown, isolated=isolate,
                    threads=threads)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        models = []
        for name in [source] + ([compare] if compare else []):
            profiler = _Profiler(name, settings, target, isolate=isolate, check_memory=check_memory, clock=clock,
                                 progress=progress, on_start=on_start, max_seconds=max_seconds)
            models.append(profiler.run(lengths))
            del profiler
            if target.type == "cuda":
                torch.cuda.empty_cache()
        env = environment(target)
    finally:
        torch.set_num_threads(previous_threads)
    comparison = compare_rows(models[0], models[1]) if compare else None
    return ProfileReport(models=models, environment=env, settings=settings, comparison=comparison)


__all__ = ["profile_model", "compare_rows", "environment"]
