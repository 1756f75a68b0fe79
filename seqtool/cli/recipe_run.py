"""Run a validated recipe: each step through the library, its output kept under OUT, finished steps skipped.

Layout: ``OUT/01-prune/`` (a checkpoint), ``OUT/04-eval/result.json`` (a measurement). A step's hash covers its
options (with the recipe's device/dtype), the hash of its input (the previous rewrite's, or the model's) and the
seqtool version; a step whose directory holds the same hash is skipped on a re-run, any other step (re)runs and
its directory is replaced. Rewrites chain, so changing step 2 re-runs 2, 3, ...; a measurement's input is the
checkpoint it measures, so changing one eval does not re-run a later profile. Every directory is written in a
temp directory beside it and renamed into place (seqtool.arch.io.atomic_output): a killed run leaves finished
steps intact and no half-written one.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqtool.cli.recipe_schema import Recipe, Step
from seqtool.errors import BadInputError

RESULT_FILE = "result.json"


@dataclass
class StepRecord:
    index: int
    name: str
    options: dict
    hash: str
    dir: str
    status: str  # ran | skipped
    seconds: float
    summary: str = ""
    result: Any = None


@dataclass
class RunResult:
    recipe: dict
    output: str
    steps: list[StepRecord] = field(default_factory=list)
    final_checkpoint: str | None = None
    seconds: float = 0.0


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_identity(model: str) -> tuple[str, str]:
    """``(recorded, hash)`` of the input model. Recorded: a preset or hub id as given, a local directory as its
    absolute path (so a replay works from anywhere). Hash: that name plus, for a directory, its config.json and
    every weight file's name, size and modification time (a changed checkpoint is a new model, without reading
    the weights)."""
    from seqtool.version import __version__
    from seqtool.arch.paths import resolve_source
    from seqtool.zoo.presets import is_preset

    recorded, files = model, []
    if not is_preset(model):
        resolved = Path(resolve_source(model)).resolve()
        if Path(model).expanduser().exists():
            recorded = str(resolved)
        config = resolved / "config.json"
        files.append(("config.json", config.read_text() if config.exists() else ""))
        for weight in sorted(resolved.glob("*.safetensors")):
            stat = weight.stat()
            files.append((weight.name, stat.st_size, stat.st_mtime_ns))
    return recorded, _digest({"model": recorded, "files": files, "seqtool": __version__})


# Gates are checked on the saved result (also of a skipped step), so changing a threshold re-measures nothing.
UNHASHED = ("fail_under", "fail_over")


def step_hash(step: Step, input_hash: str) -> str:
    from seqtool.version import __version__

    options = {k: v for k, v in step.effective.items() if k not in UNHASHED}
    return _digest({"step": step.name, "options": options, "input": input_hash, "seqtool": __version__})


def stored_hash(directory: Path, makes_checkpoint: bool) -> str | None:
    """The step hash recorded in a step directory (None when absent or unreadable)."""
    try:
        if makes_checkpoint:
            from seqtool.recipe import read_run_recipe

            return read_run_recipe(json.loads((directory / "config.json").read_text()))[1]
        return json.loads((directory / RESULT_FILE).read_text()).get("hash")
    except (OSError, ValueError, AttributeError):
        return None


def check_run_dir(out: str) -> Path:
    """OUT may exist (re-runs), but must be a directory that is not itself a checkpoint, and safe to write in."""
    from seqtool.arch.paths import check_output_path, check_writable

    path = check_output_path(out)
    if path.exists() and not path.is_dir():
        raise BadInputError(f"-o '{out}' exists and is not a directory")
    if (path / "config.json").exists():
        raise BadInputError(f"-o '{out}' is a checkpoint; -o takes a run directory (each step writes OUT/NN-step/)")
    check_writable(path / "probe")
    return path


def _summary(step: Step, result: Any) -> str:
    """A few words for the run table."""
    from seqtool.cli import gates

    if step.name == "eval":
        parts = []
        for metric in ("ppl", *gates.RETRIEVAL_TASKS):
            values = [v for _, v in gates.eval_values(result, metric) if v is not None]
            if values:
                parts.append(f"{metric} {max(values) if metric == 'ppl' else min(values):.4g}")
        return ", ".join(parts)
    if step.name == "profile":
        rows = (result.get("models") or [{}])[0].get("rows") or []
        parts = [f"prefill {r['prefill_median_s']:.3g} s @ {r['seq_len']}" for r in rows if r.get("prefill_median_s")]
        for c in result.get("comparison") or []:
            if c.get("prefill_ratio") is not None:
                parts.append(f"prefill ratio {c['prefill_ratio']:.3g}")
        return ", ".join(parts)
    if step.name == "inspect":
        return f"{result.get('family')}, {result.get('params_total')} params"
    if isinstance(result, dict) and "removed_ratio" in result:
        b, a = result.get("before") or {}, result.get("after") or {}
        return (f"heads/KV heads {b.get('heads')}/{b.get('kv_heads')} -> {a.get('heads')}/{a.get('kv_heads')}, "
                f"{100 * result['removed_ratio']:.1f} % of attention + MLP params removed")
    if isinstance(result, dict) and "spec" in result:
        return f"patch {result['spec']}"
    if isinstance(result, dict) and "heldout_ppl" in result:
        return f"held-out ppl {result.get('heldout_ppl_before', 0):.3g} -> {result['heldout_ppl']:.3g}"
    return ""


def run_recipe(recipe: Recipe, out: str, *, quiet: bool = False) -> RunResult:
    """Run (or resume) ``recipe`` into run directory ``out``; returns what each step did. Gates of eval/profile
    steps raise GateFailedError after their result is saved (the run stops there)."""
    from seqtool.arch.io import atomic_output
    from seqtool.cli.common import log, to_jsonable, working
    from seqtool.cli.gates import check_gates, parse_gates
    from seqtool.cli.recipe_steps import after_call, build_call, run_call
    from seqtool.recipe import attach_run_recipe

    started = time.monotonic()
    root = check_run_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    result = RunResult(recipe.to_dict(), str(root))
    recorded_model, source_hash = model_identity(recipe.model)
    source = recipe.model
    rewrites: list[dict] = []
    n = len(recipe.steps)
    progress = "off" if quiet else "auto"
    for step in recipe.steps:
        h = step_hash(step, source_hash)
        directory = root / f"{step.index:02d}-{step.name}"
        label = f"[{step.index}/{n}] {step.name}"
        if step.spec.makes_checkpoint:
            rewrites.append({step.name: dict(step.options)})
        t0 = time.monotonic()
        if stored_hash(directory, step.spec.makes_checkpoint) == h:
            status, data = "skipped", None
            if not step.spec.makes_checkpoint:
                data = json.loads((directory / RESULT_FILE).read_text()).get("result")
            log(f"{label}: skipped, {directory} is up to date")
        else:
            status = "ran"
            options = ", ".join(f"{k}={v}" for k, v in step.options.items())
            log(f"{label} {options} -> {directory}")
            with atomic_output(directory, force=True, validate=lambda _path: None) as tmp:
                if step.spec.makes_checkpoint:
                    call = build_call(step, source, str(tmp), final_dir=str(directory), progress=progress)
                    with working(label):
                        value = run_call(call)
                    run_recipe_dict = {"model": recorded_model,
                                       **{k: v for k, v in (("device", recipe.device), ("dtype", recipe.dtype)) if v},
                                       "steps": list(rewrites)}
                    attach_run_recipe(tmp, run_recipe_dict, h)
                else:
                    call = build_call(step, source, None, progress=progress)
                    with working(label):
                        value = run_call(call)
                    after_call(step, call, value)
                data = to_jsonable(value)
                if not step.spec.makes_checkpoint:
                    record = {"step": {step.name: step.options}, "input": source, "hash": h, "result": data}
                    (tmp / RESULT_FILE).write_text(json.dumps(record, indent=2) + "\n")
            log(f"{label}: done in {time.monotonic() - t0:.1f} s")
        record = StepRecord(step.index, step.name, dict(step.options), h, str(directory), status,
                            round(time.monotonic() - t0, 3), result=data)
        if data is not None:
            try:
                record.summary = _summary(step, data)
            except (KeyError, TypeError, ValueError):
                record.summary = ""
        result.steps.append(record)
        if step.spec.makes_checkpoint:
            source, source_hash = str(directory), h
            result.final_checkpoint = str(directory)
        elif data is not None and step.name in ("eval", "profile"):
            key = "fail_under" if step.name == "eval" else "fail_over"
            gates = parse_gates(step.effective.get(key), step.name, flag=key)
            check_gates(gates, data, step.name, prefix=f"step {step.index} ({step.name}): ")
    result.seconds = round(time.monotonic() - started, 3)
    return result


def render(result: RunResult) -> str:
    from seqtool.cli.common import table

    rows = [(r.index, r.name, r.status, f"{r.seconds:.1f}", r.dir, r.summary) for r in result.steps]
    lines = [table(rows, ["step", "name", "status", "seconds", "output", "result"]), ""]
    ran = sum(r.status == "ran" for r in result.steps)
    lines.append(f"{ran} step(s) ran, {len(result.steps) - ran} skipped (up to date) in {result.seconds:.1f} s")
    if result.final_checkpoint:
        lines.append(f"final checkpoint: {result.final_checkpoint} (reproduce: seqtool run "
                     f"{result.final_checkpoint} -o OUT)")
    return "\n".join(lines)
