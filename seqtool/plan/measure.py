"""Measure the real peak memory of one recipe step, to check a plan against it (tests and benchmarks).

``python -m seqtool.plan.measure RESULT.json`` reads ``{"model", "command", "options", "dtype", "warmup_model"}``
on stdin, runs the step's library call (the same call its CLI command makes) and writes
``{"peak_bytes": ..., "method": ...}``.

What is measured: the increase of the process's peak resident set size (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``; see :class:`seqtool.profile.memory.PeakMemory`) over its size just before the step.
Before that baseline, the same step runs once on a tiny preset (``warmup_model``) in the same process, so the
libraries the step imports lazily (peft, tokenizers, safetensors, torch's CPU kernels and thread pools) are
already resident and are not counted: the plan predicts what the step allocates, not the Python runtime. Each
step runs in a fresh process so allocator caches of earlier work do not hide its peak, and with glibc's mmap
threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``): every tensor above that is returned to the OS when freed,
so the peak RSS follows the bytes alive at once. With the default adaptive threshold glibc keeps freed chunks of
up to 32 MiB in its heap and a small model's peak RSS can be up to ~2x its live peak (allocator retention, not
memory the step needs; ``fixed_mmap=False`` measures that way).
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# glibc serves allocations above this many bytes with mmap and returns them to the OS on free (fixed, not adaptive)
MMAP_THRESHOLD = 65536


# The steps the issue names, sized for ``ref`` (tests/plan and ``benchmarks/memory_plan.py --steps ref``), with the
# cheaper options their warm-up runs on tiny-llama (same code paths, shorter).
REF_STEPS: list[tuple[str, dict, dict]] = [
    ("inspect", {}, {}),
    ("profile", {"seq_len": 1024, "decode_tokens": 8, "warmup": 0, "repeats": 1},
     {"seq_len": 64, "decode_tokens": 2, "warmup": 0, "repeats": 1}),
    ("eval", {"task": "ppl", "seq_len": 1024, "ppl_tokens": 4096}, {"task": "ppl", "seq_len": 64, "ppl_tokens": 256}),
    ("prune", {"ratio": 0.2, "samples": 16, "seq_len": 128}, {"ratio": 0.2, "samples": 2, "seq_len": 32}),
    ("convert", {"to": "gqa", "kv_heads": 4}, {"to": "gqa", "kv_heads": 2}),
    ("finetune", {"method": "lora", "steps": 2, "batch": 2, "seq_len": 256, "eval_rows": 2},
     {"method": "lora", "steps": 1, "batch": 1, "seq_len": 32, "eval_rows": 1}),
]

# Also in the benchmark's ref table (not in the test, to keep it short): LoRA with KL to a frozen teacher.
REF_EXTRA_STEPS: list[tuple[str, dict, dict]] = [
    ("finetune", {"method": "lora", "steps": 2, "batch": 2, "seq_len": 256, "eval_rows": 2, "teacher": "ref",
                  "loss": "lm=1,kl=1"},
     {"method": "lora", "steps": 1, "batch": 1, "seq_len": 32, "eval_rows": 1, "teacher": "tiny-llama",
      "loss": "lm=1,kl=1"}),
]


def run_step(model: str, command: str, options: dict, *, dtype: str | None, device: str = "cpu",
             workdir: str | Path) -> None:
    """Run one step the way its CLI command does (outputs written under ``workdir``)."""
    opts = dict(options)
    dt = dtype or "auto"
    out = str(Path(workdir) / f"{command}-out")
    if command == "inspect":
        from seqtool.arch.inspect import inspect_model

        inspect_model(model, dtype=dt)
    elif command == "profile":
        from seqtool.profile.run import profile_model

        # in process: on CPU the CLI runs each length in a fresh subprocess doing exactly this
        profile_model(model, dtype=dt, device=device, isolate=False, check_memory=False, **opts)
    elif command == "eval":
        from seqtool import evaluate

        task = opts.pop("task", "ppl")
        seq_len = opts.pop("seq_len", 2048)
        evaluate(model, task, seq_lens=[int(seq_len)], dtype=dt, device=device, **opts)
    elif command == "prune":
        from seqtool.convert.pipeline import prune_model

        prune_model(model, opts.pop("ratio"), output=out, dtype=dt, device=device, **opts)
    elif command == "convert":
        from seqtool.convert import convert

        convert(model, opts.pop("to"), output=out, dtype=dt, device=device, **opts)
    elif command == "finetune":
        from seqtool.train.finetune import finetune

        finetune(model, output=out, dtype=dtype if dtype not in (None, "auto") else "fp32", device=device,
                 progress="off", **opts)
    else:
        raise ValueError(f"no measurement for step '{command}'")


def _trim() -> None:
    """Return freed heap memory to the OS, so the baseline holds no garbage of the warm-up."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    import seqtool.profile.memory as memory_module
    from seqtool.profile.memory import PeakMemory

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    with tempfile.TemporaryDirectory(prefix="seqtool-plan-warm-") as tmp:
        if spec.get("warmup_model"):
            run_step(spec["warmup_model"], spec["command"], spec.get("warmup_options", spec["options"]),
                     dtype=spec.get("dtype"), workdir=tmp)
    gc.collect()
    _trim()
    with tempfile.TemporaryDirectory(prefix="seqtool-plan-run-") as tmp:
        meter = PeakMemory(torch.device("cpu"))
        meter.start()
        # a step that measures itself (profile) must not reset the kernel's peak counter under this meter
        memory_module._reset_peak_rss = lambda: False
        run_step(spec["model"], spec["command"], spec["options"], dtype=spec.get("dtype"), workdir=tmp)
        reading = meter.stop()
    return {"peak_bytes": int(reading.increase_bytes), "method": reading.method}


def measure_peak(model: str, command: str, options: dict, *, dtype: str | None = None,
                 warmup_model: str | None = "tiny-llama", warmup_options: dict | None = None,
                 threads: int | None = 1, timeout_s: float | None = None, fixed_mmap: bool = True) -> dict[str, Any]:
    """Peak memory increase (bytes) of one step, run in a fresh ``python`` process; see the module docstring.
    ``fixed_mmap=False`` measures with glibc's default (adaptive) mmap threshold instead."""
    spec = {"model": model, "command": command, "options": options, "dtype": dtype, "warmup_model": warmup_model,
            "threads": threads}
    if warmup_options is not None:
        spec["warmup_options"] = warmup_options
    with tempfile.TemporaryDirectory(prefix="seqtool-plan-") as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", **({"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)} if fixed_mmap else {})}
        proc = subprocess.run([sys.executable, "-m", "seqtool.plan.measure", str(result)], input=json.dumps(spec),
                              capture_output=True, text=True, env=env, timeout=timeout_s)
        if proc.returncode != 0 or not result.exists():
            tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
            raise RuntimeError(f"measuring {command} on {model} failed (exit {proc.returncode}): {tail}")
        return json.loads(result.read_text())


if __name__ == "__main__":
    out_path = Path(sys.argv[1])
    outcome = _child(json.loads(sys.stdin.read()))
    out_path.write_text(json.dumps(outcome))
