"""Peak-memory measurement and the per-length measurement subprocess."""
from __future__ import annotations

import subprocess
import sys

import torch

import seqtool

from seqtool.profile.memory import is_oom_error, run_in_subprocess


def test_cpu_peak_captures_a_freed_allocation():
    """In a fresh process, as every CPU measurement runs (:func:`run_in_subprocess`): in the test process, memory
    that earlier tests left resident can serve the allocation without raising the peak."""
    code = ("import torch\nfrom seqtool.profile.memory import PeakMemory\n"
            "meter = PeakMemory(torch.device('cpu'))\nmeter.start()\n"
            "block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched\ndel block\n"
            "r = meter.stop()\nprint(r.method, r.increase_bytes)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    method, increase = out.stdout.split()
    assert method.startswith("cpu_")
    assert 60 * 1024**2 <= int(increase) < 200 * 1024**2


def test_oom_classification():
    assert is_oom_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_oom_error(MemoryError())
    assert is_oom_error(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert not is_oom_error(RuntimeError("shape mismatch"))
    assert not is_oom_error(ValueError("out of memory"))


def test_subprocess_killed_by_sigkill_is_reported_as_oom():
    """What the kernel's OOM killer does to a measurement process."""
    kill_self = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    outcome = run_in_subprocess({}, argv=kill_self)
    assert outcome.oom and outcome.result is None and outcome.returncode == -9


def test_each_length_runs_in_a_fresh_process():
    """The default CPU path: profile_model spawns the worker, which loads the model and measures one length."""
    report = seqtool.profile("tiny-llama", seq_len=64, decode_tokens=2, warmup=0, repeats=1, threads=1)
    assert report.settings["isolated"] and report.environment.threads == 1
    row = report.models[0].rows[0]
    assert row.status == "ok", row.note
    assert row.memory_method == "cpu_peak_rss_increase" and row.peak_memory_bytes > 0
    assert row.kv_cache_bytes == 2 * 2 * 4 * 16 * 64 * 4
    assert row.kv_cache_bytes_final == 2 * 2 * 4 * 16 * 66 * 4
    assert row.prefill_median_s > 0 and row.decode_tokens == 2
