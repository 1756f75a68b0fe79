"""Long-context training attention on CPU: peak memory and time of s2attn / sinklora vs SDPA causal at 8k.

1. The attention op alone, forward + backward, 1 x 8 heads x 8192 x 32 (ref's head shape), fp32:
   SDPA causal (PyTorch's CPU flash kernel, no T x T tensor), SDPA with a materialised T x T boolean mask (what a
   padded batch gets through transformers' sdpa mask), s2attn and sinklora (group 2048, 4 sinks).
2. One training step (forward + backward of the LM loss) of the shipped ``ref`` model at 8192 tokens, batch 1,
   fp32, with its attention set to each method.

Each case runs in a fresh subprocess so allocator caches of one case do not hide the next one's peak; the peak is
the increase of the process's peak RSS over its size before the case (seqtool.profile.memory.PeakMemory).
One torch thread (the machine's two cores are shared); wall time and the thread's CPU time are reported.

Run: python benchmarks/long_context.py [--seq-len 8192] [--group-size 2048] [--repeats 2]
     [--out benchmarks/results/long_context-cpu.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

OP_CASES = ["sdpa_causal", "sdpa_tt_mask", "s2attn", "sinklora"]
MODEL_CASES = ["sdpa", "s2attn", "sinklora"]


def _case(kind: str, name: str, seq_len: int, group: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    from seqtool.profile.memory import PeakMemory
    from seqtool.train.shifted_attention import ShiftedSpec, attention_work, shifted_attention_forward

    torch.set_num_threads(1)
    torch.manual_seed(0)
    result: dict = {"kind": kind, "case": name, "seq_len": seq_len, "group_size": group}
    if kind == "op":
        q, k, v = (torch.randn(1, 8, seq_len, 32, requires_grad=True) for _ in range(3))
        spec = {"s2attn": ShiftedSpec("s2attn", group), "sinklora": ShiftedSpec("sinklora", group, 4)}.get(name)

        def step():
            if name == "sdpa_causal":
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            elif name == "sdpa_tt_mask":
                mask = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            else:
                out = shifted_attention_forward(q, k, v, spec)
            out.square().mean().backward()
            q.grad = k.grad = v.grad = None

        if spec is not None:
            kept, dense = attention_work(seq_len, spec, 8)
            result["work_fraction"] = kept / dense
        else:
            result["work_fraction"] = 1.0
    else:
        from seqtool.arch.io import load_model
        from seqtool.train.shifted_attention import apply_shifted_attention

        model = load_model("ref", dtype="fp32").model
        model.train()
        ids = torch.randint(3, model.config.vocab_size, (1, seq_len))
        if name != "sdpa":
            apply_shifted_attention(model, name, group_size=group)
            kept, dense = attention_work(seq_len, ShiftedSpec(name, group, 4 if name == "sinklora" else 0), 8)
            result["work_fraction"] = kept / dense
        else:
            result["work_fraction"] = 1.0

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            model.zero_grad(set_to_none=True)

    # Peak: the first step in this fresh process (a warm-up would leave freed pages in the allocator and hide
    # the peak); time: the best of the following repeats.
    meter = PeakMemory(torch.device("cpu"))
    meter.start()
    step()
    peak = meter.stop().increase_bytes
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.thread_time()
        step()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.thread_time() - c0)
    result.update(wall_s=min(walls), cpu_s=min(cpus), peak_increase_mib=peak / 2**20,
                  tokens_per_s=seq_len / min(walls))
    return result


def _run_child(kind: str, name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, name, "--seq-len", str(args.seq_len),
           "--group-size", str(args.group_size), "--repeats", str(args.repeats)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"kind": kind, "case": name, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows: list[dict], kind: str) -> list[str]:
    base = next((r for r in rows if r["kind"] == kind and r["case"] in ("sdpa_causal", "sdpa")), None)
    out = ["| attention | work (pairs vs dense causal) | peak RSS increase | wall | CPU | tokens/s (wall) | CPU vs SDPA |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != kind:
            continue
        if "error" in r:
            out.append(f"| {r['case']} | error: {r['error']} | | | | | |")
            continue
        ratio = r["cpu_s"] / base["cpu_s"] if base and "cpu_s" in base else float("nan")
        out.append(f"| {r['case']} | {r['work_fraction']:.3f} | {r['peak_increase_mib']:.0f} MiB | {r['wall_s']:.2f} s | "
                   f"{r['cpu_s']:.2f} s | {r['tokens_per_s']:.0f} | {ratio:.2f}x |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--group-size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/long_context-cpu.md")
    parser.add_argument("--render", metavar="JSON", help="Re-write the table from a results JSON (no measuring).")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_case(args.child[0], args.child[1], args.seq_len, args.group_size, args.repeats)))
        return
    if args.render:
        rows = json.loads(Path(args.render).read_text())
    else:
        rows = [_run_child("op", c, args) for c in OP_CASES]
        if not args.skip_model:
            rows += [_run_child("model", c, args) for c in MODEL_CASES]
    import torch

    has_model = any(r["kind"] == "model" for r in rows)
    lines = [f"# Long-context training attention, CPU ({platform.processor() or platform.machine()}, torch "
             f"{torch.__version__}, 1 thread)", "",
             f"Command: `python benchmarks/long_context.py --seq-len {args.seq_len} --group-size {args.group_size} "
             f"--repeats {args.repeats}` (run under `nice -n 10` on a shared, loaded 2-core machine: wall times include "
             "preemption, CPU = the thread's own CPU time; best wall/CPU of the repeats after the first step; peak "
             "RSS increase of the first step in a fresh process).", "",
             f"## Attention op, forward + backward, 1 x 8 x {args.seq_len} x 32 fp32", "", *_table(rows, "op")]
    if has_model:
        lines += ["", f"## `ref` training step (LM loss forward + backward), batch 1 x {args.seq_len} tokens, fp32", "",
                  *_table(rows, "model")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    if not args.render:
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
