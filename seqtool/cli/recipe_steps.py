"""How each recipe step calls the library: a step's options → one public-API call (as its CLI command does).

:func:`build_call` is pure (it only describes the call), so tests can check that every option of every command
reaches the library; :func:`preflight` runs the checks a command makes before loading anything, for every step,
before the first step runs. Options pass to the library under the command's parameter names; only the few
that the commands themselves translate (eval's lengths and depths, patch's ``--set``, hybrid's row length) are
translated here.
"""
from __future__ import annotations

import inspect as _inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from seqtool.cli.recipe_schema import Recipe, RecipeError, Step
from seqtool.errors import BadInputError, SeqtoolError

# Options the runner handles after the library call instead of passing them on.
POST_OPTIONS = {"profile": ("csv", "plot", "fail_over"), "eval": ("fail_under",)}
RECOVER_MODES = (None, "none", "lora", "full", "distill")


@dataclass
class Call:
    """One library call: ``fn`` (a name in :data:`FUNCTIONS`), its arguments, and runner-side options."""

    fn: str
    args: tuple
    kwargs: dict
    post: dict = field(default_factory=dict)
    threads: int | None = None
    offload: dict = field(default_factory=dict)  # device_map / max_memory: accelerate placement around the call


def _public(name: str) -> Callable:
    """``seqtool.<name>``, imported when called (the CLI starts without torch)."""

    def call(*args, **kwargs):
        import seqtool

        return getattr(seqtool, name)(*args, **kwargs)

    return call


def _patch(*a, **k):
    # the checkpoint-writing form of seqtool.patch (as `seqtool patch` calls it)
    from seqtool.patches.checkpoint import patch_checkpoint

    return patch_checkpoint(*a, **k)


FUNCTIONS: dict[str, Callable] = {"prune": _public("prune"), "convert": _public("convert"),
                                  "finetune": _public("finetune"), "eval": _public("evaluate"),
                                  "profile": _public("profile"), "inspect": _public("inspect"), "patch": _patch}


def _convert_signature() -> set[str]:
    from seqtool.convert.pipeline import convert

    return set(_inspect.signature(convert).parameters)


def _params(step: Step, skip=()) -> dict[str, Any]:
    return {step.spec.param_of(k): v for k, v in step.effective.items() if k not in skip}


def _floats(text: str, key: str) -> list[float]:
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise BadInputError(f"malformed {key} '{text}'; use e.g. 0,0.25,0.5") from None


def build_call(step: Step, source: str, output: str | None, *, final_dir: str | None = None,
               progress: str = "off") -> Call:
    """The library call for ``step`` on ``source`` writing ``output`` (rewrite steps)."""
    call = _build_call(step, source, output, final_dir=final_dir, progress=progress)
    call.offload = {k: call.kwargs.pop(k) for k in OFFLOAD_OPTIONS if k in call.kwargs}
    return call


# Options the runner applies around the call, as the commands do (`offload_option`), not library arguments.
OFFLOAD_OPTIONS = ("device_map", "max_memory")


def _build_call(step: Step, source: str, output: str | None, *, final_dir: str | None, progress: str) -> Call:
    name, opts = step.name, step.effective
    post = {k: opts[k] for k in POST_OPTIONS.get(name, ()) if k in opts}
    write = {"output": output, "force": True}
    if name == "prune":
        kw = _params(step, skip=("ratio",))
        return Call("prune", (source, opts["ratio"]), {**kw, **write, "progress": progress})
    if name == "convert":
        generic = _convert_signature()
        kw, conv = {}, {}
        for param, value in _params(step, skip=("to",)).items():
            (kw if param in generic else conv)[param] = value
        if opts["to"] == "hybrid":
            if "seq_len" in kw:
                conv["train_seq_len"] = kw["seq_len"]
            if "run_dir" not in kw and not (conv.get("steps1") == 0 and conv.get("steps2") == 0):
                kw["run_dir"] = f"{final_dir or output}.run"
        return Call("convert", (source, opts["to"]), {**kw, **conv, **write, "progress": progress})
    if name == "finetune":
        kw = _params(step, skip=("threads",))
        return Call("finetune", (source,), {**kw, **write, "progress": progress}, threads=opts.get("threads"))
    if name == "patch":
        kw = _params(step, skip=("method", "set"))
        if "set" in opts:
            kw["set_options"] = list(opts["set"])
        return Call("patch", (source, opts["method"]), {**kw, **write})
    if name == "eval":
        kw = _params(step, skip=("task", "seq_len", "depths", "ppl_tokens", *post))
        from seqtool.utils import parse_length_list

        if "seq_len" in opts:
            kw["seq_lens"] = parse_length_list(opts["seq_len"])
        if "depths" in opts:
            kw["depths"] = _floats(opts["depths"], "depths")
        if "ppl_tokens" in opts:
            kw["ppl_tokens"] = opts["ppl_tokens"] or None
        return Call("eval", (source, opts.get("task", "all")), kw, post=post)
    if name == "profile":
        return Call("profile", (source,), _params(step, skip=post), post=post)
    if name == "inspect":
        return Call("inspect", (source,), _params(step))
    raise SeqtoolError(f"{step.label}: seqtool run has no runner for '{name}' steps yet")


def preflight(recipe: Recipe) -> None:
    """The checks each command makes before loading anything, for every step (so a bad step 5 fails before
    step 1 runs). Raises one line naming the step."""
    from seqtool.arch.io import resolve_device, resolve_dtype
    from seqtool.cli.common import check_model
    from seqtool.cli.gates import parse_gates

    check_model(recipe.model)
    for step in recipe.steps:
        opts = step.effective
        try:
            if "device" in opts:
                resolve_device(opts["device"])
            if "dtype" in opts:
                resolve_dtype(opts["dtype"])
            if opts.get("device_map") or opts.get("max_memory"):
                from seqtool.arch.offload import make_offload

                make_offload(opts.get("device_map"), opts.get("max_memory"))
            for key in ("compare", "teacher"):
                if opts.get(key):
                    check_model(opts[key])
            if opts.get("recover") not in RECOVER_MODES:
                raise BadInputError(f"unknown recover '{opts['recover']}'; use lora, full or distill")
            if step.name == "prune":
                if not 0 < opts["ratio"] < 1:
                    raise BadInputError(f"ratio must be in (0, 1), got {opts['ratio']:g}")
            if step.name in ("prune", "convert"):
                _check_conversion(step)
            if step.name == "patch":
                from seqtool.patches import list_methods

                if opts["method"] not in list_methods():
                    raise BadInputError(f"unknown method '{opts['method']}'; methods: {', '.join(list_methods())}")
            if step.name == "eval":
                parse_gates(opts.get("fail_under"), "eval", flag="fail_under", tasks=opts.get("task", "all"))
                from seqtool.eval.runner import ALL_TASKS

                tasks = [t.strip() for t in str(opts.get("task", "all")).split(",") if t.strip()]
                bad = [t for t in tasks if t != "all" and t not in ALL_TASKS]
                if bad:
                    raise BadInputError(f"unknown task '{bad[0]}'; tasks: {', '.join(ALL_TASKS)} or all")
            if step.name == "profile":
                from seqtool.utils import parse_length, parse_length_list

                parse_gates(opts.get("fail_over"), "profile", flag="fail_over")
                if "seq_len" in opts:
                    parse_length(opts["seq_len"])
                if "sweep" in opts:
                    parse_length_list(opts["sweep"])
            build_call(step, "model", "out")
        except BadInputError as exc:
            raise RecipeError(f"{step.label}: {exc}") from None


def _check_conversion(step: Step) -> None:
    from seqtool.cli.convert_cmd import CONVERSION_NAMES
    from seqtool.convert.pipeline import make_conversion

    opts = step.effective
    if step.name == "convert":
        if opts["to"] not in CONVERSION_NAMES or opts["to"] == "prune":
            names = [n for n in CONVERSION_NAMES if n != "prune"]
            raise BadInputError(f"unknown conversion '{opts['to']}'; to: {', '.join(names)} (pruning is a prune step)")
    call = build_call(step, "model", "out")
    generic = _convert_signature()
    options = {k: v for k, v in call.kwargs.items() if k not in generic}
    if step.name == "prune":
        options["ratio"] = opts["ratio"]
    make_conversion(call.args[1] if step.name == "convert" else "prune", options)


def run_call(call: Call) -> Any:
    """Run the library call (``threads`` set and ``--device-map/--max-memory`` placement active for its
    duration)."""
    from seqtool.cli.common import offload_option

    with offload_option(call.offload.get("device_map"), call.offload.get("max_memory"), *call.args[:1]):
        if call.threads:
            import torch

            previous = torch.get_num_threads()
            torch.set_num_threads(call.threads)
            try:
                return FUNCTIONS[call.fn](*call.args, **call.kwargs)
            finally:
                torch.set_num_threads(previous)
        return FUNCTIONS[call.fn](*call.args, **call.kwargs)


def after_call(step: Step, call: Call, result: Any) -> None:
    """Runner-side options: profile's --csv / --plot files, and a profile that failed to measure (exit 1)."""
    if step.name != "profile":
        return
    from seqtool.profile.report import write_csv, write_plot
    from seqtool.profile.results import ERROR

    if call.post.get("csv"):
        write_csv(result, call.post["csv"])
    if call.post.get("plot"):
        write_plot(result, call.post["plot"])
    failed = [(m.source, r) for m in result.models for r in m.rows if r.status == ERROR]
    if failed:
        source, row = failed[0]
        raise SeqtoolError(f"{step.label}: profiling {source} at {row.seq_len} tokens failed: {row.note}")
