"""Peak memory of seqtool on models bigger than the machine (docs/big_models.md).

Steps (each a `python -m seqtool ...` subprocess, measured with os.wait4: peak RSS = the child's ru_maxrss, wall time):

1. `seqtool zoo save PRESET -o WORK/in` : a random real-shape preset (default llama-3.1-8b, bf16, 2 GB shards),
   written tensor by tensor;
2. `seqtool convert WORK/in --to gqa --kv-heads N --stream --max-shard-size S -o WORK/out` for each output shard
   size S of --shard-sizes (the input keeps its 2 GB shards);
3. optional (--eval-preset llama-3.2-1b): `seqtool eval` / `seqtool profile` fully loaded vs `--device-map auto
   --max-memory cpu=SIZE` on a saved copy of that preset.

Each row is appended to the JSON results as soon as it is done (a rerun skips finished rows); --render writes the
markdown table into docs/big_models.md between the `big-model` markers. Large outputs are deleted after measuring
unless --keep. Run it niced, one thread, in the background:

    nice -n 10 python benchmarks/big_model.py --work /tmp/bigmodel > /tmp/big_model.log 2>&1 &
    python benchmarks/big_model.py --render-only
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK_BEGIN, MARK_END = "<!-- big-model:begin -->", "<!-- big-model:end -->"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-3.1-8b")
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--shard-sizes", default="2GB,500MB", help="output --max-shard-size values for convert")
    p.add_argument("--work", default="/tmp/seqtool-bigmodel")
    p.add_argument("--results", default=str(ROOT / "benchmarks/results/big_model.json"))
    p.add_argument("--doc", default=str(ROOT / "docs/big_models.md"))
    p.add_argument("--eval-preset", default=None, help="e.g. llama-3.2-1b: eval/profile full vs offloaded")
    p.add_argument("--max-memory", default="cpu=1GB", help="offload budget of the eval/profile rows")
    p.add_argument("--eval-seq-len", default="256")
    p.add_argument("--skip-convert", action="store_true")
    p.add_argument("--in-memory", action="store_true", help="also run the first convert with --no-stream (the model "
                   "loaded in fp32: only for presets that fit)")
    p.add_argument("--prune-ratio", type=float, default=None, help="also: prune --criterion magnitude --stream")
    p.add_argument("--save-only", action="store_true", help="stop after writing the input preset")
    p.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    p.add_argument("--render-only", action="store_true")
    return p.parse_args()


def run(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``; its wall time, peak RSS (MiB, from wait4's rusage of that child alone) and exit status."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    stdout = log.with_name("last_stdout.json")
    with open(log, "a") as err, open(stdout, "w") as out:
        err.write("$ " + " ".join(cmd) + "\n")
        err.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    row = {"cmd": " ".join(cmd[3:]), "rc": code, "wall_s": round(wall, 1),
           "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}
    try:
        result = json.loads(stdout.read_text())
    except ValueError:
        return row
    if result.get("ppl"):
        row["result"] = f"ppl {result['ppl'][0]['ppl']}"
    elif result.get("models"):
        first = result["models"][0]["rows"][0]
        row["result"] = f"prefill {first.get('prefill_median_s')} s, decode {first.get('decode_s_per_token')} s/token"
    return row


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def largest_shard(path: Path) -> int:
    return max((f.stat().st_size for f in path.glob("*.safetensors")), default=0)


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"rows": []}


def save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def render(data: dict) -> str:
    rows = ["| step | model size | largest input shard | largest output shard | peak RSS | wall time | result | command |",
            "|---|---|---|---|---|---|---|---|"]
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b else "-"  # noqa: E731
    short = lambda text: text if text.startswith("ppl") else re.sub(  # noqa: E731
        r"\d+\.\d{4,}", lambda m: f"{float(m.group()):.3g}", text)
    order = sorted(range(len(data["rows"])), key=lambda i: (-data["rows"][i].get("model_bytes", 0),
                                                            not data["rows"][i]["step"].startswith("zoo save"), i))
    for r in (data["rows"][i] for i in order):
        rows.append(f"| {r['step']} | {gib(r.get('model_bytes', 0))} | {gib(r.get('input_shard_bytes', 0))} | "
                    f"{gib(r.get('output_shard_bytes', 0))} | {r['peak_rss_mib'] / 1024:.2f} GiB | "
                    f"{r['wall_s']:.0f} s | {short(r.get('result', ''))} | `seqtool {r['cmd']}` |")
    return "\n".join(rows)


def write_doc(doc: Path, data: dict) -> None:
    text = doc.read_text() if doc.exists() else f"{MARK_BEGIN}\n{MARK_END}\n"
    head, rest = text.split(MARK_BEGIN, 1)
    _, tail = rest.split(MARK_END, 1)
    doc.write_text(f"{head}{MARK_BEGIN}\n{render(data)}\n{MARK_END}{tail}")


def main() -> None:
    args = parse_args()
    results, doc = Path(args.results), Path(args.doc)
    data = load(results)
    if args.render_only:
        write_doc(doc, data)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    done = {r["step"] for r in data["rows"] if r.get("rc") == 0}
    py = [sys.executable, "-m", "seqtool"]
    src = work / f"{args.preset}-in"

    def record(step: str, row: dict, **extra) -> None:
        row = {"step": step, **row, **extra, "date": time.strftime("%Y-%m-%d %H:%M")}
        print(json.dumps(row), flush=True)
        data["rows"] = [r for r in data["rows"] if r["step"] != step] + [row]
        save(results, data)
        if row["rc"] != 0:
            sys.exit(f"step {step} failed; see {log}")

    if not args.skip_convert:
        convert_steps = [f"convert --to gqa --kv-heads {args.kv_heads} --stream ({args.preset}, out shards {s})"
                         for s in args.shard_sizes.split(",")]
        save_step = f"zoo save {args.preset} (2GB shards)"
        if not all(s in done for s in [save_step, *convert_steps]):
            if not (src / "config.json").exists():
                shutil.rmtree(src, ignore_errors=True)
                row = run([*py, "zoo", "save", args.preset, "-o", str(src), "--max-shard-size", "2GB", "--json"], log)
                record(save_step, row, model_bytes=dir_bytes(src), output_shard_bytes=largest_shard(src))
            if args.save_only:
                return
            for size, step in zip(args.shard_sizes.split(","), convert_steps):
                if step in done:
                    continue
                out = work / f"{args.preset}-gqa{args.kv_heads}"
                shutil.rmtree(out, ignore_errors=True)
                row = run([*py, "convert", str(src), "--to", "gqa", "--kv-heads", str(args.kv_heads), "--stream",
                           "--max-shard-size", size, "-o", str(out), "--json"], log)
                record(step, row, model_bytes=dir_bytes(src), input_shard_bytes=largest_shard(src),
                       output_shard_bytes=largest_shard(out), output_bytes=dir_bytes(out))
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
        extra_rows = []
        if args.in_memory:
            size = args.shard_sizes.split(",")[0]
            extra_rows.append((f"convert --to gqa --kv-heads {args.kv_heads} --no-stream ({args.preset}, out shards "
                               f"{size})", ["convert", str(src), "--to", "gqa", "--kv-heads", str(args.kv_heads),
                                            "--no-stream", "--max-shard-size", size]))
        if args.prune_ratio:
            extra_rows.append((f"prune --ratio {args.prune_ratio} --criterion magnitude --stream ({args.preset})",
                               ["prune", str(src), "--ratio", str(args.prune_ratio), "--criterion", "magnitude",
                                "--stream"]))
        for step, cmd in extra_rows:
            if step in done:
                continue
            out = work / f"{args.preset}-extra"
            shutil.rmtree(out, ignore_errors=True)
            row = run([*py, *cmd, "-o", str(out), "--json"], log)
            record(step, row, model_bytes=dir_bytes(src), input_shard_bytes=largest_shard(src),
                   output_shard_bytes=largest_shard(out), output_bytes=dir_bytes(out))
            shutil.rmtree(out, ignore_errors=True)

    if args.eval_preset:
        small = work / f"{args.eval_preset}-in"
        if not (small / "config.json").exists():
            run([*py, "zoo", "save", args.eval_preset, "-o", str(small), "--json"], log)
        for cmd in ("eval", "profile"):
            opts = (["--task", "ppl", "--seq-len", args.eval_seq_len, "--ppl-tokens", "512", "--dtype", "bf16"]
                    if cmd == "eval" else ["--seq-len", args.eval_seq_len, "--dtype", "bf16", "--threads", "1"])
            for label, extra in (("full load", []), (f"--max-memory {args.max_memory}",
                                                    ["--device-map", "auto", "--max-memory", args.max_memory])):
                step = f"{cmd} {args.eval_preset} ({label})"
                if step in done:
                    continue
                row = run([*py, cmd, str(small), *opts, *extra, "--json"], log)
                record(step, row, model_bytes=dir_bytes(small))
        if not args.keep:
            shutil.rmtree(small, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(src, ignore_errors=True)
    write_doc(doc, data)


if __name__ == "__main__":
    main()
