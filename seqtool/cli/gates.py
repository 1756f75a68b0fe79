"""CI gates: ``seqtool eval ... --fail-under passkey=0.9,ppl=40`` and ``seqtool profile A --compare B --fail-over
prefill=0.8`` exit 1 with one line when a measured metric is worse than its threshold.

Semantics: every metric knows which way is better, and a gate fails when the metric is *worse* than its
threshold. Accuracies (passkey, niah, multikey, vt; in [0, 1]) must be at least the threshold; perplexity, NLL
and every profile number (times, memory, KV bytes, and with ``--compare`` the ratios compare / MODEL) must be at
most the threshold. The flag names follow each command's usual case (eval measures quality: fail under the bar;
profile measures cost: fail over the budget), but on eval ``ppl=40`` still means "ppl must not exceed 40".
A metric measured at several lengths must pass at every length (the worst one decides). A threshold outside the
metric's range is allowed and simply fails (``passkey=1.5``); an unknown metric is a bad-input error (exit 2),
as is a metric the run does not measure (``--fail-under passkey`` with ``--task ppl``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from seqtool.errors import BadInputError, SeqtoolError

# Eval tasks (seqtool.eval.ALL_TASKS; a test keeps them equal) so that gates are checked without importing torch.
EVAL_TASKS = ("ppl", "passkey", "niah", "multikey", "vt")
RETRIEVAL_TASKS = EVAL_TASKS[1:]
EVAL_METRICS = {"ppl": "lower", "nll": "lower", **{t: "higher" for t in RETRIEVAL_TASKS}}
# profile metric -> (LengthResult field without --compare, ComparisonRow field with it); all: lower is better
PROFILE_METRICS = {
    "prefill": ("prefill_median_s", "prefill_ratio"),
    "ttft": ("ttft_s", "ttft_ratio"),
    "decode": ("decode_s_per_token", "decode_ratio"),
    "peak_memory": ("peak_memory_bytes", "peak_memory_ratio"),
    "kv_cache": ("kv_cache_bytes", "kv_cache_ratio"),
}

FailUnderOpt = Annotated[str | None, typer.Option(
    "--fail-under", help="CI gate: METRIC=THRESHOLD[,...] with METRIC in ppl, nll, passkey, niah, multikey, vt; exit 1 "
    "when a metric is worse than its threshold at any length (accuracy below it; ppl / nll above it).",
    show_default=False)]
FailOverOpt = Annotated[str | None, typer.Option(
    "--fail-over", help="CI gate: METRIC=THRESHOLD[,...] with METRIC in prefill, ttft, decode, peak_memory, kv_cache; "
    "exit 1 when it is above THRESHOLD at any length. With --compare: the ratio compare / MODEL; without: seconds "
    "(decode: per token) or bytes.", show_default=False)]


class GateFailedError(SeqtoolError):
    """A CI gate failed: the measurement ran, a metric is worse than its threshold (exit 1)."""


@dataclass(frozen=True)
class Gate:
    metric: str
    threshold: float
    direction: str  # "higher" (fail below) | "lower" (fail above)


def parse_gates(text: str | None, command: str, *, flag: str | None = None, tasks: str | None = None) -> list[Gate]:
    """``"passkey=0.9,ppl=40"`` → gates; unknown metrics, malformed items and (eval) metrics the ``tasks``
    do not measure are one-line BadInputErrors."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return []
    flag = flag or ("--fail-under" if command == "eval" else "--fail-over")
    known = EVAL_METRICS if command == "eval" else {m: "lower" for m in PROFILE_METRICS}
    items = text.items() if isinstance(text, dict) else (i.partition("=")[::2] for i in str(text).split(",") if i.strip())
    gates = []
    for name, value in items:
        name = str(name).strip()
        if name not in known:
            raise BadInputError(f"{flag}: unknown metric '{name}' for {command}; metrics: {', '.join(known)}")
        try:
            threshold = float(value)
        except (TypeError, ValueError):
            raise BadInputError(f"{flag}: '{name}' needs a number, e.g. {name}=0.9 (got '{value}')") from None
        if math.isnan(threshold):
            raise BadInputError(f"{flag}: '{name}' needs a number, got nan")
        gates.append(Gate(name, threshold, known[name]))
    if command == "eval" and tasks is not None:
        chosen = [t.strip() for t in str(tasks).split(",") if t.strip()]
        measured = set(EVAL_TASKS) if "all" in chosen else set(chosen)
        for gate in gates:
            task = "ppl" if gate.metric in ("ppl", "nll") else gate.metric
            if task not in measured:
                raise BadInputError(f"{flag} {gate.metric} needs --task {task} (or all); this run measures "
                                    f"{', '.join(chosen)}")
    return gates


def eval_values(result: dict, metric: str) -> list[tuple[str, float | None]]:
    """(where, value) of ``metric`` in an eval result's JSON: ppl / nll per ppl row, a task's accuracy per length
    (mean over depths, weighted by samples, as the eval table's mean row)."""
    if metric in ("ppl", "nll"):
        return [(f"{row['seq_len']} tokens", row.get(metric)) for row in result.get("ppl") or []]
    out = []
    for length in result.get("seq_lens") or []:
        rows = [s for s in result.get("scores") or [] if s["task"] == metric and s["seq_len"] == length]
        total = sum(s["samples"] for s in rows)
        if rows:
            out.append((f"{length} tokens", sum(s["accuracy"] * s["samples"] for s in rows) / total if total else None))
    return out


def profile_values(report: dict, metric: str) -> list[tuple[str, float | None]]:
    """(where, value) of ``metric`` in a profile report's JSON: the ratios with --compare, else MODEL's rows."""
    row_field, ratio_field = PROFILE_METRICS[metric]
    if report.get("comparison"):
        return [(f"{c['seq_len']} tokens", c.get(ratio_field)) for c in report["comparison"]]
    models = report.get("models") or []
    return [(f"{r['seq_len']} tokens" + ("" if r.get("status") == "ok" else f" ({r.get('status')})"), r.get(row_field))
            for r in (models[0]["rows"] if models else [])]


def failures(gates: list[Gate], result: Any, command: str) -> list[str]:
    """One text per failed gate (empty when all pass). ``result`` is the result object or its JSON dict."""
    if not gates:
        return []
    from seqtool.cli.common import to_jsonable

    data = result if isinstance(result, dict) else to_jsonable(result)
    comparing = command == "profile" and bool(data.get("comparison"))
    failed = []
    for gate in gates:
        label = f"{gate.metric} ratio" if comparing else gate.metric
        values = eval_values(data, gate.metric) if command == "eval" else profile_values(data, gate.metric)
        if not values:
            failed.append(f"{label} was not measured (gate {gate.metric}={gate.threshold:g})")
            continue
        for where, value in values:
            if value is None or (isinstance(value, float) and math.isnan(value)):
                failed.append(f"{label} was not measured at {where} (gate {gate.metric}={gate.threshold:g})")
                break
            worse = value < gate.threshold if gate.direction == "higher" else value > gate.threshold
            if worse:
                side = "below" if gate.direction == "higher" else "above"
                failed.append(f"{label} {value:.4g} at {where} is {side} the threshold {gate.threshold:g}")
                break
    return failed


def check_gates(gates: list[Gate], result: Any, command: str, prefix: str = "") -> None:
    """Raise :class:`GateFailedError` (one line naming metric, value and threshold) when a gate fails."""
    failed = failures(gates, result, command)
    if failed:
        raise GateFailedError(f"{prefix}gate failed: " + "; ".join(failed))
