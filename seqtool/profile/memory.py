"""Peak memory of a measurement, and running a measurement in its own process.

- CUDA: ``torch.cuda`` max allocated / max reserved since a reset, plus the increase over what was allocated
  before (the model's weights).
- CPU: the increase of the process's peak resident set size (``VmHWM``) over its size before the run. Linux
  lets a process reset its peak (``/proc/self/clear_refs`` ← 5); elsewhere a sampling thread watches RSS.
  On CPU each length runs in a fresh subprocess (:func:`run_in_subprocess`) so allocator caches of earlier
  lengths do not hide later peaks, and an out-of-memory kill takes down the child, not the sweep.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory", "defaultcpuallocator")


@dataclass
class PeakReading:
    peak_bytes: int
    increase_bytes: int
    reserved_bytes: int | None
    method: str


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def current_rss() -> int:
    rss = _status_kib("VmRSS")
    if rss is None:
        import psutil

        rss = psutil.Process().memory_info().rss
    return rss


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter for this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


class PeakMemory:
    """``start()`` … ``stop() -> PeakReading`` around a measurement on ``device``."""

    def __init__(self, device: torch.device, *, sample_interval_s: float = 0.005):
        self.device = torch.device(device)
        self.sample_interval_s = sample_interval_s
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return
        self._base = current_rss()
        self._kernel_peak = _reset_peak_rss()
        if not self._kernel_peak:
            self._sampled, self._stop = self._base, threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.sample_interval_s):
            self._sampled = max(self._sampled, current_rss())

    def stop(self) -> PeakReading:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            return PeakReading(peak, peak - self._base, torch.cuda.max_memory_reserved(self.device),
                               "cuda_max_allocated")
        if self._kernel_peak:
            peak = _status_kib("VmHWM")
            method = "cpu_peak_rss_increase"
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._sampled, current_rss())
            method = "cpu_sampled_rss_increase"
        return PeakReading(peak - self._base, peak - self._base, None, method)


def is_oom_error(exc: BaseException) -> bool:
    """True for CUDA/CPU allocation failures (which a sweep records as OOM and moves past)."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _OOM_TEXT)


@dataclass
class ChildOutcome:
    """What a measurement subprocess produced: its JSON result, or why there is none."""

    result: dict | None
    oom: bool
    returncode: int
    stderr_tail: str


def run_in_subprocess(spec: dict, *, argv: list[str] | None = None, timeout_s: float | None = None) -> ChildOutcome:
    """Run ``python -m seqtool.profile.worker`` on ``spec`` (JSON on stdin) and read its JSON result.

    A child killed by SIGKILL (what the kernel's OOM killer sends) or failing with an allocation error is
    reported as ``oom=True``. ``argv`` replaces the command (tests).
    """
    with tempfile.TemporaryDirectory(prefix="seqtool-profile-") as tmp:
        out_path = Path(tmp) / "result.json"
        command = (argv or [sys.executable, "-m", "seqtool.profile.worker"]) + [str(out_path)]
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
        try:
            proc = subprocess.run(command, input=json.dumps(spec), capture_output=True, text=True, env=env,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return ChildOutcome(None, False, -1, f"timed out after {timeout_s} s")
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        result = json.loads(out_path.read_text()) if out_path.exists() and proc.returncode == 0 else None
        killed = proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL, 137)
        oom = killed or (result is None and any(t in proc.stderr.lower() for t in _OOM_TEXT))
        return ChildOutcome(result, oom, proc.returncode, tail)
