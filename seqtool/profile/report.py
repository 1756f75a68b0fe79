"""Render a :class:`ProfileReport`: text tables, CSV and a PNG plot (no measurement here)."""
from __future__ import annotations

import csv
import math
from dataclasses import asdict, fields
from pathlib import Path

from seqtool.errors import BadInputError
from seqtool.profile.breakdown import KINDS
from seqtool.profile.results import OK, LengthResult, ProfileReport
from seqtool.utils import format_bytes, format_count


def _tab(rows, headers) -> str:
    from tabulate import tabulate

    return tabulate(list(rows), headers=list(headers), tablefmt="simple", disable_numparse=True)


def _num(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def fmt_seconds(s: float | None) -> str:
    if not _num(s):
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.2f} s"


def fmt_flops(n: float | None) -> str:
    if not _num(n):
        return "-"
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f}"


def fmt_ratio(r: float | None) -> str:
    return f"{r:.2f}x" if _num(r) else "-"


def fmt_len(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def fmt_rate(x: float | None) -> str:
    return f"{x:.1f}" if _num(x) else "-"


def fmt_tflops(x: float | None) -> str:
    return f"{x:.3g}" if _num(x) else "-"


ROW_HEADERS = ("seq_len", "prefill p50", "prefill p90", "TTFT", "decode/token", "decode tok/s", "peak memory",
               "KV cache", "prefill FLOPs", "TFLOP/s", "note")


def _row(r: LengthResult) -> list[str]:
    if r.status != OK:
        blank = ["-"] * (len(ROW_HEADERS) - 3)
        return [fmt_len(r.seq_len), r.status.upper(), *blank, r.note]
    return [fmt_len(r.seq_len), fmt_seconds(r.prefill_median_s), fmt_seconds(r.prefill_p90_s), fmt_seconds(r.ttft_s),
            fmt_seconds(r.decode_s_per_token), fmt_rate(r.decode_tokens_per_s), format_bytes(r.peak_memory_bytes),
            format_bytes(r.kv_cache_bytes), fmt_flops(r.prefill_flops), fmt_tflops(r.prefill_tflops), r.note]


def render(report: ProfileReport) -> str:
    """The text ``seqtool profile`` prints: a header and a table per model, breakdowns, then ratios."""
    env, s = report.environment, report.settings
    parts = []
    for m in report.models:
        memory = "peak RSS increase" if m.device == "cpu" else "CUDA max allocated"
        parts.append(
            f"{m.source}: {m.family}, {format_count(m.params)} params, {m.dtype}, weights {format_bytes(m.weight_bytes)}, "
            f"attn {m.attn} | {env.device_name} ({env.device_type}, {env.threads} threads) | batch {s['batch']}, "
            f"{s['decode_tokens']} decode tokens, {s['repeats']} repeats + {s['warmup']} warmup | "
            f"memory = {memory}")
        rows = [_row(r) for r in m.rows]
        headers = list(ROW_HEADERS)
        if not any(r.note for r in m.rows):  # drop an all-empty note column
            rows, headers = [row[:-1] for row in rows], headers[:-1]
        parts.append(_tab(rows, headers))
        with_parts = [r for r in m.rows if r.breakdown_s]
        if with_parts:
            parts.append(f"prefill time by module kind ({m.source}):")
            parts.append(_tab(([fmt_len(r.seq_len)] + [_share(r.breakdown_s, k) for k in KINDS]
                               + [fmt_seconds(r.breakdown_s.get("total"))] for r in with_parts),
                              ("seq_len", *KINDS, "total")))
        routed = [r for r in m.rows if r.routing]
        if routed:
            parts.append(f"routing balance per router ({m.source}; imbalance = experts x largest share, 1 = even):")
            names = [b["router"] for b in routed[0].routing]
            parts.append(_tab(([fmt_len(r.seq_len)] + [f"{b['imbalance']:.2f}" for b in r.routing] for r in routed),
                              ("seq_len", *names)))
    if report.comparison:
        base, other = report.models[0].source, report.models[1].source
        parts.append(f"ratios {other} / {base}:")
        parts.append(_tab(([fmt_len(c.seq_len), fmt_ratio(c.prefill_ratio), fmt_ratio(c.ttft_ratio),
                            fmt_ratio(c.decode_ratio), fmt_ratio(c.peak_memory_ratio), fmt_ratio(c.kv_cache_ratio)]
                           for c in report.comparison),
                          ("seq_len", "prefill", "TTFT", "decode/token", "peak memory", "KV cache")))
    return "\n\n".join(parts)


def _share(parts: dict, kind: str) -> str:
    total = parts.get("total") or 0.0
    value = parts.get(kind, 0.0)
    pct = f" ({100 * value / total:.0f}%)" if total > 0 else ""
    return fmt_seconds(value) + pct


_NESTED = ("breakdown_s", "prefill_samples_s", "routing")  # lists / dicts: not CSV columns


def flat_rows(report: ProfileReport) -> list[dict]:
    """One flat dict per (model, length): model fields, row fields, ``breakdown_<kind>_s``."""
    out = []
    for m in report.models:
        head = {"model": m.source, "family": m.family, "params": m.params, "weight_bytes": m.weight_bytes,
                "dtype": m.dtype, "device": m.device, "attn": m.attn}
        for r in m.rows:
            row = {k: v for k, v in asdict(r).items() if k not in _NESTED}
            row["routing_max_imbalance"] = max((b["imbalance"] for b in r.routing), default=None) if r.routing else None
            for kind in (*KINDS, "total"):
                row[f"breakdown_{kind}_s"] = (r.breakdown_s or {}).get(kind)
            out.append({**head, **row})
    return out


def csv_columns() -> list[str]:
    row = [f.name for f in fields(LengthResult) if f.name not in _NESTED] + ["routing_max_imbalance"]
    return ["model", "family", "params", "weight_bytes", "dtype", "device", "attn", *row,
            *(f"breakdown_{k}_s" for k in (*KINDS, "total"))]


def check_output_path(path: str | Path, option: str) -> Path:
    """Fail before measuring when an output file cannot be written."""
    path = Path(path).expanduser()
    if not path.parent.exists():
        raise BadInputError(f"{option} {path}: directory '{path.parent}' does not exist")
    if path.is_dir():
        raise BadInputError(f"{option} {path} is a directory; give a file name")
    return path


def write_csv(report: ProfileReport, path: str | Path) -> Path:
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=csv_columns())
        writer.writeheader()
        for row in flat_rows(report):
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return path


def require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BadInputError("--plot needs matplotlib; install it with: pip install 'seqtool[plot]'") from None
    return plt


def write_plot(report: ProfileReport, path: str | Path) -> Path:
    """Prefill latency, decode latency, peak memory and KV bytes against length, one line per model."""
    plt = require_matplotlib()
    panels = (("prefill p50 (s)", "prefill_median_s"), ("decode (s/token)", "decode_s_per_token"),
              ("peak memory (GiB)", "peak_memory_bytes"), ("KV cache (GiB)", "kv_cache_bytes"))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (title, key) in zip(axes.flat, panels):
        scale = 1 / 1024**3 if key.endswith("bytes") else 1.0
        for m in report.models:
            points = [(r.seq_len, getattr(r, key) * scale) for r in m.rows if r.status == OK and _num(getattr(r, key))]
            if points:
                ax.plot(*zip(*points), marker="o", label=m.source)
        ax.set_title(title)
        ax.set_xlabel("sequence length")
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    env = report.environment
    fig.suptitle(f"seqtool profile: {env.device_name} ({env.device_type}), batch {report.settings['batch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
