"""Quality of every attention patch on the reference model: ppl, passkey, multikey, vt next to dense.

Rows: every budgeted method at budgets 0.5 / 0.25 / 0.1 at 2k, ``act`` (no budget) and ``dense`` at 2k, and
streaming / infllm / longheads at every budget also at 4k and 8k (beyond ref's trained 2048 tokens) next to dense
at those lengths. Every row runs ``seqtool.evaluate(model, tasks, attn="METHOD:budget=B,min_len=0")`` with fixed
sample counts and reports the kept fraction *as measured* by the patch handle: over the perplexity windows
(prefill), over the retrieval prompts (prefill + token-by-token tail + answer), and over the decode calls alone.

Resumable: each finished row is written to the JSON file at once; a rerun skips rows whose settings match and
regenerates the markdown table (``benchmarks/results/patch_quality.md`` and the quality-table section of
docs/patches.md). Run in the background:

    nohup nice -n 5 python benchmarks/patch_quality.py > /tmp/patch_quality.log 2>&1 &
    python benchmarks/patch_quality.py --model tiny-llama --quick        # smoke test, writes *-quick files only
    python benchmarks/patch_quality.py --table-only                      # re-render from the JSON
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "patches.md"
START, END = "<!-- quality-table:start -->", "<!-- quality-table:end -->"

BUDGETED = ("streaming", "vertical_slash", "block_topk", "hip", "infllm", "razor", "recycled", "longheads", "snapkv",
            "h2o", "expected_attention")
LONG = ("streaming", "infllm", "longheads")
BUDGETS = (0.5, 0.25, 0.1)
TASKS = ("passkey", "multikey", "vt")
TRAINED_LEN = 2048
#: Extra options per method (stated under the table). LongHeads' point is to stay within the trained length.
EXTRA = {"longheads": {"trained_len": TRAINED_LEN}}


@dataclass(frozen=True)
class Settings:
    """Fixed sample counts (part of every cached row: changing them recomputes the row)."""

    samples: int = 5
    depths: tuple[float, ...] = (0.25, 0.5, 0.75)
    ppl_tokens: int = 8192
    long_samples: int = 2  # per depth at 4k / 8k (an 8k prompt costs several 2k ones on CPU)
    tail: int = 16
    seed: int = 0
    batch: int = 5

    def samples_at(self, seq_len: int) -> int:
        return self.samples if seq_len <= 2048 else self.long_samples  # prompts beyond 2k cost several 2k ones


QUICK = Settings(samples=1, depths=(0.5,), ppl_tokens=512, long_samples=1, tail=4)


@dataclass(frozen=True)
class Row:
    method: str
    budget: float | None
    seq_len: int

    @property
    def key(self) -> str:
        return f"{self.method}|{self.budget}|{self.seq_len}"

    def spec(self) -> str:
        opts = {"budget": self.budget} if self.budget is not None else {}
        opts.update(min_len=0, **EXTRA.get(self.method, {}))
        return f"{self.method}:" + ",".join(f"{k}={v}" for k, v in opts.items())


def all_rows(lengths: tuple[int, int, int]) -> list[Row]:
    """Every row, most informative first (a partial run still has every method at budget 0.25 and each length)."""
    short, mid, long = lengths
    rows = [Row("dense", None, short), *(Row(m, 0.25, short) for m in BUDGETED), Row("act", None, short)]
    for n in (mid, long):
        rows += [Row("dense", None, n), *(Row(m, 0.25, n) for m in LONG)]
    rows += [Row(m, b, short) for b in (0.1, 0.5) for m in BUDGETED]
    rows += [Row(m, b, n) for n in (mid, long) for b in (0.1, 0.5) for m in LONG]
    return rows


def rows_at(seq_len: int) -> list[Row]:
    """``--at LEN``: dense and every budgeted method at one length (a context-extended model's own context),
    budget 0.25 first, then 0.1 and 0.5."""
    return [Row("dense", None, seq_len)] + [Row(m, b, seq_len) for b in (0.25, 0.1, 0.5) for m in BUDGETED]


@contextlib.contextmanager
def count_decode(acc: list[float]):
    """Add the kept / causal pairs of decode calls (``call.is_decode``) to ``acc`` while inside the block."""
    from seqtool.patches import runtime

    original = getattr(runtime, "_run_method", None)
    if original is None:  # the runtime changed shape: decode kept fraction is then not reported
        acc[:] = [float("nan"), float("nan")]
        yield
        return

    def counted(rt, call):
        kept0 = float(rt.kept_pairs.sum()) if rt.kept_pairs is not None else 0.0
        total0 = rt.total_pairs
        out = original(rt, call)
        if call.is_decode:
            acc[0] += float(rt.kept_pairs.sum()) - kept0
            acc[1] += rt.total_pairs - total0
        return out

    runtime._run_method = counted
    try:
        yield
    finally:
        runtime._run_method = original


def run_row(loaded, row: Row, st: Settings) -> dict:
    """Evaluate one row; the patch is applied by ``evaluate(attn=...)`` and removed afterwards."""
    import seqtool
    from seqtool.patches import get_handle

    t0 = time.time()
    spec = row.spec()
    n = st.samples_at(row.seq_len)
    common = dict(seq_lens=(row.seq_len,), seed=st.seed, batch=st.batch)
    ppl_res = seqtool.evaluate(loaded, "ppl", attn=spec, ppl_tokens=max(st.ppl_tokens, row.seq_len) - 1,
                              **common)
    handle = get_handle(loaded.model)
    if handle is None:
        raise RuntimeError(f"evaluate(attn={spec!r}) left no patch on the model")
    kept_ppl = handle.kept_fraction()
    handle.reset_stats()
    decode = [0.0, 0.0]
    try:
        with count_decode(decode):  # the patch stays applied: attn=None leaves the model as it is
            res = seqtool.evaluate(loaded, list(TASKS), attn=None, samples=n, depths=st.depths, tail=st.tail,
                                   recall="answer", **common)
        kept_tasks = handle.kept_fraction()
        heads = handle.options.get("heads")
    finally:
        handle.remove()
    ppl = ppl_res.ppl[0]
    return {
        "key": row.key, "method": row.method, "budget": row.budget, "seq_len": row.seq_len, "spec": spec,
        "settings": settings_dict(st), "ppl": ppl.ppl, "ppl_tokens": ppl.tokens, "ppl_stride": ppl.stride,
        "accuracy": {t: round(res.mean_accuracy(t, row.seq_len), 4) for t in TASKS},
        "by_depth": {t: {str(s.depth): s.accuracy for s in res.scores if s.task == t} for t in TASKS},
        "samples_per_depth": n,
        "kept_ppl": kept_ppl, "kept_tasks": kept_tasks,
        "kept_decode": decode[0] / decode[1] if decode[1] else None,
        "heads": list(heads) if heads is not None else None,
        "recall": {r.task: {"answer": r.answer, "all": r.all} for r in getattr(res, "recall", [])},
        "seconds": round(time.time() - t0, 1),
    }


def settings_dict(st: Settings) -> dict:
    d = asdict(st)
    d["depths"] = list(st.depths)
    return d


def fingerprint(loaded) -> str:
    from seqtool.arch.io import weights_fingerprint

    return weights_fingerprint(loaded.model)


def load_cache(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"rows": {}}


def save_cache(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _len(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _fmt(x, digits=3) -> str:
    if x is None or x != x:
        return "–"
    return f"{x:.{digits}f}"


def render(data: dict, rows: list[Row]) -> str:
    """Markdown table (rows in table order; missing rows listed below it)."""
    st = data.get("settings", {})
    order = sorted(rows, key=lambda r: (r.seq_len, r.method != "dense",
                                        BUDGETED.index(r.method) if r.method in BUDGETED else 99,
                                        -(r.budget or 2)))
    head = ("| method | budget | len | ppl | passkey | multikey | vt | kept (ppl) | kept (tasks) | kept (decode) "
            "| recall (answer) | s |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines, missing = [head], []
    for r in order:
        got = data["rows"].get(r.key)
        if got is None:
            missing.append(r)
            continue
        acc = got["accuracy"]
        rec = got.get("recall", {}).get("passkey", {})
        lines.append(f"| {r.method} | {r.budget if r.budget is not None else '–'} | {_len(r.seq_len)} "
                     f"| {got['ppl']:.2f} | {acc['passkey']:.2f} | {acc['multikey']:.2f} | {acc['vt']:.2f} "
                     f"| {_fmt(got['kept_ppl'])} | {_fmt(got['kept_tasks'])} | {_fmt(got['kept_decode'])} "
                     f"| {_fmt(rec.get('answer'), 2)} | {got['seconds']:.0f} |")
    depths = ", ".join(str(d) for d in st.get("depths", []))
    razor = next((g.get("heads") for g in data["rows"].values() if g["method"] == "razor" and g.get("heads")), None)
    act = next((g.get("heads") for g in data["rows"].values() if g["method"] == "act"), None)
    notes = [
        "",
        f"Model `{data.get('model')}` (weights {data.get('fingerprint')}), {data.get('machine', '')}. "
        f"Every row: `seqtool.evaluate(model, tasks, attn=\"METHOD:budget=B,min_len=0\")`, seed {st.get('seed')}, "
        f"batch {st.get('batch')}. ppl: sliding window (stride len/2) over the first "
        f"{st.get('ppl_tokens')} held-out tokens (at least one window of len). passkey / multikey / vt: exact match, "
        f"{st.get('samples')} samples × depths {depths} per task at 2k, {st.get('long_samples')} samples × the "
        f"same depths at 4k and 8k; the last {st.get('tail')} prompt tokens are fed one at a time through the "
        "patch's cache, then the answer is generated greedily.",
        "Kept fraction = kept / causal (query, key) pairs as counted by the selection that ran (evicted keys count "
        "as skipped): *ppl* over the perplexity windows (prefill), *tasks* over every call of the retrieval "
        "prompts, *decode* over the decode calls alone (≤ 16 queries with a past: the tail and the answer). "
        "Recall (`evaluate(recall=\"answer\")`, passkey prompts): share of the dense attention mass the selections "
        "kept (evicted keys count as lost), mean over layers and heads, on the *answer* queries (the last prompt "
        "token and the generated ones); – where the row predates the column (all-query recall: "
        "`benchmarks/sparse_recall.py`, `seqtool eval --recall`). "
        "`dense` is the `dense` patch (SDPA through the same runtime). Options are each method's defaults except `min_len=0`"
        + (f" and `trained_len={TRAINED_LEN}` for longheads" if "longheads" in EXTRA else "") + ". "
        + (f"razor retrieval heads found offline: {', '.join(razor)}. " if razor else "")
        + (f"act calibrated heads: {', '.join(act) if act else 'none found'}. " if act is not None else "")
        + (f"ref is trained to {TRAINED_LEN} tokens: 4k and 8k rows are beyond it. " if TRAINED_LEN == 2048
           else f"The model is trained to {TRAINED_LEN} tokens. ")
        + "s = wall seconds of the row.",
    ]
    if missing:
        notes.append("")
        notes.append("Not yet measured (run `python benchmarks/patch_quality.py` to resume): "
                     + ", ".join(f"{r.method}@{r.budget}/{_len(r.seq_len)}" if r.budget is not None
                                 else f"{r.method}/{_len(r.seq_len)}" for r in missing) + ".")
    return "\n".join(lines + notes) + "\n"


def write_doc(doc: Path, table: str) -> None:
    text = doc.read_text()
    block = f"{START}\n{table}{END}"
    if START in text and END in text:
        text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n## Quality on `ref`\n\nGenerated by `python benchmarks/patch_quality.py` " \
               "(resumable; see the script).\n\n" + block + "\n"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    global TRAINED_LEN
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ref", help="preset or checkpoint (default ref)")
    ap.add_argument("--quick", action="store_true", help="tiny sample counts and 1024/1536/2048 tokens (smoke test)")
    ap.add_argument("--out", type=Path, help="JSON cache (default benchmarks/results/patch_quality.json; "
                                             "/tmp/patch_quality-MODEL[-quick].json for other models or --quick)")
    ap.add_argument("--doc", type=Path, help="markdown file whose quality-table section is regenerated "
                                             "(default docs/patches.md for the full ref run, else none)")
    ap.add_argument("--rows", default=None, help="regex on row keys METHOD|BUDGET|LEN to run only some rows")
    ap.add_argument("--redo", default=None, help="regex on row keys: re-run these rows even if cached (after a "
                                                  "method changed)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("SEQTOOL_THREADS", "1")),
                    help="torch threads (1: the shared 2-core machine stalls multi-threaded regions)")
    ap.add_argument("--at", type=int, default=None, help="only dense and every budgeted method at this length "
                                                          "(e.g. 8192 for a context-extended model)")
    ap.add_argument("--trained-len", type=int, default=TRAINED_LEN,
                    help="the model's trained context (longheads' trained_len; stated under the table)")
    ap.add_argument("--table-only", action="store_true", help="re-render the table from the JSON, run nothing")
    args = ap.parse_args(argv)
    TRAINED_LEN = args.trained_len
    EXTRA["longheads"] = {"trained_len": TRAINED_LEN}

    full = args.model == "ref" and not args.quick and args.at is None
    tag = "" if full else f"-{Path(args.model).name}" + ("-quick" if args.quick else "")
    out = args.out or (RESULTS / "patch_quality.json" if full else Path("/tmp") / f"patch_quality{tag}.json")
    md = out.with_suffix(".md")
    doc = args.doc or (DOC if full else None)
    st = QUICK if args.quick else Settings()
    lengths = (1024, 1536, 2048) if args.quick else (2048, 4096, 8192)
    rows = rows_at(args.at) if args.at else all_rows(lengths)
    data = load_cache(out)

    def publish() -> None:
        table = render(data, rows)
        md.write_text("# Patch quality (generated by benchmarks/patch_quality.py)\n\n" + table)
        if doc is not None:
            write_doc(doc, table)

    if args.table_only:
        publish()
        print(render(data, rows))
        return 0

    import seqtool
    from seqtool.patches import get_handle

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loaded = seqtool.load(args.model, dtype="float32", device="cpu")
    fp = fingerprint(loaded)
    if data.get("fingerprint") not in (None, fp):
        print(f"weights changed ({data.get('fingerprint')} -> {fp}): cached rows dropped", file=sys.stderr)
        data = {"rows": {}}
    data.update(model=args.model, fingerprint=fp, settings=settings_dict(st),
                machine=f"{platform.machine()} CPU, {args.threads} torch threads, fp32 (shared, loaded machine)")
    failed: list[str] = []
    todo = [r for r in rows if not (args.rows and not re.search(args.rows, r.key))]
    for i, row in enumerate(todo):
        got = data["rows"].get(row.key)
        if got is not None and got.get("settings") == settings_dict(st) and not (
                args.redo and re.search(args.redo, row.key)):
            continue
        print(f"[{time.strftime('%H:%M:%S')}] row {i + 1}/{len(todo)} {row.key} ({row.spec()}) ...",
              file=sys.stderr, flush=True)
        try:
            result = run_row(loaded, row, st)
        except Exception:  # one broken method must not stop the background run; the row stays missing
            traceback.print_exc()
            failed.append(row.key)
            handle = get_handle(loaded.model)
            if handle is not None:
                handle.remove()
            continue
        data["rows"][row.key] = result
        save_cache(out, data)
        publish()
        print(f"[{time.strftime('%H:%M:%S')}]   ppl {result['ppl']:.2f} acc {result['accuracy']} kept "
              f"{_fmt(result['kept_ppl'])}/{_fmt(result['kept_tasks'])}/{_fmt(result['kept_decode'])} "
              f"in {result['seconds']:.0f} s", file=sys.stderr, flush=True)
    publish()
    print(render(data, rows))
    if failed:
        print(f"failed rows (see the tracebacks above; rerun to retry): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
