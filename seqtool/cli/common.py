"""Shared CLI pieces: option aliases, error handling, result rendering, progress.

Rules every command follows: results on stdout (a table, or JSON with ``--json``), logs and progress on stderr,
no progress bars or colour when stderr is not a terminal or with ``--quiet``, exit codes 0 ok / 2 bad input /
1 failure, and a one-line ``error: ...`` instead of a traceback (``SEQTOOL_DEBUG=1`` shows it).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
from contextlib import contextmanager
from typing import Annotated, Any, Callable, Iterable, Iterator

import typer

from seqtool.errors import SeqtoolError

ModelArg = Annotated[str, typer.Argument(help="Local checkpoint directory, preset name (tiny-llama, llama-3.2-1b, ref, ...) or cached hub id.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or log output on stderr.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto|fp32|bf16|fp16 (auto: a checkpoint's own dtype, upcast to fp32 on CPU; bf16 for real-shape presets).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto|cpu|cuda.")]
OutputOpt = Annotated[str | None, typer.Option("--output", "-o", help="Output checkpoint directory.", show_default=False)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")]
InPlaceOpt = Annotated[bool, typer.Option("--in-place", help="Overwrite the input checkpoint (safely, via a backup).")]
StreamOpt = Annotated[bool | None, typer.Option("--stream/--no-stream", help="Rewrite a checkpoint directory shard by shard, one layer in memory (default: only when the model would not fit in memory; docs/big_models.md).", show_default=False)]
MaxShardOpt = Annotated[str, typer.Option("--max-shard-size", help="Largest safetensors shard written, e.g. 2GB, 500MiB.")]
DeviceMapOpt = Annotated[str | None, typer.Option("--device-map", help="auto: place layers with accelerate within --max-memory, the rest offloaded to disk (docs/big_models.md).", show_default=False)]
MaxMemoryOpt = Annotated[str | None, typer.Option("--max-memory", help="Per-device budget for --device-map auto, e.g. cpu=8GB or cuda:0=20GB,cpu=30GB.", show_default=False)]
AttnOpt = Annotated[str | None, typer.Option("--attn", help="Attention: sdpa|eager or a seqtool patch spec, e.g. block_topk:budget=0.25,min_len=0.", show_default=False)]

_state = {"quiet": False}
# Off a terminal, long work prints one status line this often (seconds); tests lower it.
STATUS_INTERVAL_S = float(os.environ.get("SEQTOOL_STATUS_INTERVAL", "30"))


def set_quiet(quiet: bool) -> None:
    from seqtool.utils import set_notices_quiet

    _state["quiet"] = quiet
    set_notices_quiet(quiet)


def is_quiet() -> bool:
    return _state["quiet"]


def log(message: str) -> None:
    """A log line on stderr (suppressed by --quiet)."""
    if not _state["quiet"]:
        print(message, file=sys.stderr, flush=True)


def log_start(message: str) -> None:
    """'doing X ...' before long work: on a terminal only (off it, status lines report progress), so that a
    run that fails on bad input prints nothing but its one error line."""
    if progress_enabled():
        log(message)


@contextmanager
def working(description: str) -> Iterator[None]:
    """Around one long library call: ``description ...`` on a terminal; off it, a status line every
    ``STATUS_INTERVAL_S`` seconds (``description: step 0, 2m00s elapsed``) so CI logs do not look hung."""
    if _state["quiet"]:
        yield
    elif sys.stderr.isatty():
        log(f"{description} ...")
        yield
    else:
        with status_lines(description):
            yield


def progress_enabled() -> bool:
    return not _state["quiet"] and sys.stderr.isatty()


@contextmanager
def progress(description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr when it is a terminal; yields ``advance(n=1)``. Off a terminal (CI logs),
    a status line ``description: step n/total, elapsed, ETA`` every ``STATUS_INTERVAL_S`` seconds instead."""
    if _state["quiet"]:
        yield lambda n=1: None
        return
    if not sys.stderr.isatty():
        with status_lines(description, total) as advance:
            yield advance
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


@contextmanager
def status_lines(description: str, total: int | None = None, interval: float | None = None
                 ) -> Iterator[Callable[[int], None]]:
    """Print ``description: step n/total, 1m30s elapsed, ETA 2m10s`` on stderr every ``interval`` seconds from
    a background thread (so a single long step still shows life); yields ``advance(n=1)``."""
    import threading
    import time

    interval = STATUS_INTERVAL_S if interval is None else interval
    state = {"done": 0}
    start = time.monotonic()
    stop = threading.Event()

    def line() -> str:
        elapsed = time.monotonic() - start
        step = f"step {state['done']}/{total}" if total else f"step {state['done']}"
        eta = ""
        if total and state["done"]:
            eta = f", ETA {_duration(elapsed / state['done'] * (total - state['done']))}"
        return f"{description}: {step}, {_duration(elapsed)} elapsed{eta}"

    def beat() -> None:
        while not stop.wait(interval):
            if not _state["quiet"]:
                print(line(), file=sys.stderr, flush=True)

    thread = threading.Thread(target=beat, name="seqtool-status", daemon=True)
    thread.start()
    try:
        yield lambda n=1: state.__setitem__("done", state["done"] + n)
    finally:
        stop.set()
        thread.join(timeout=1)


def check_model(model: str):
    """Resolve MODEL (directory, preset or cached hub id) and check a directory's config.json and weight-file
    headers, without importing torch: a typo or a broken checkpoint is reported at once."""
    from seqtool.arch.paths import check_source

    return check_source(model)


def check_output(model: str, output: str | None, *, in_place: bool, force: bool) -> str | None:
    """Before any work: the directory a command will write (``-o``, or the input with ``--in-place``; None if
    neither), checked by :func:`seqtool.arch.paths.prepare_output` (safe path, not a preset in place, exists
    without --force, writable; stale temp dirs beside it removed). New writing commands call this."""
    from pathlib import Path

    from seqtool.arch.paths import in_place_target, prepare_output

    if output is None and not in_place:
        return None
    target = output if output is not None else in_place_target(model)
    resolved = check_model(model)
    source_dir = resolved if isinstance(resolved, Path) else None
    prepare_output(target, force=force, in_place=in_place, source_dir=source_dir, source=model)
    return target


def offload_option(device_map: str | None, max_memory: str | None, *models: str | None):
    """A context for the command's library call: ``load_model`` inside it places weights with accelerate as
    ``--device-map/--max-memory`` say (a no-op when neither is given); bad values, and ``models`` that are
    presets (built in memory, nothing to offload), are one-line errors before any work."""
    from seqtool.arch.offload import make_offload, offloading

    setting = make_offload(device_map, max_memory)
    if setting is not None:
        from seqtool.zoo.presets import is_preset

        for model in models:
            if model is not None and is_preset(model):
                _preset_error(model)
    return offloading(setting)


def _preset_error(model: str):
    from seqtool.errors import BadInputError

    raise BadInputError(f"--device-map/--max-memory need a checkpoint directory, not the preset '{model}' "
                        f"(write it with `seqtool zoo save {model} -o DIR`)")


def to_jsonable(value: Any) -> Any:
    """Dataclasses, paths, dtypes, NaN → plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def emit(result: Any, as_json: bool, render: Callable[[Any], str]) -> None:
    """Print ``result`` as JSON or as the command's table."""
    if as_json:
        print(json.dumps(to_jsonable(result), indent=2))
    else:
        print(render(result))


def table(rows: Iterable[Iterable[Any]], headers: Iterable[str]) -> str:
    from tabulate import tabulate

    return tabulate(list(rows), headers=list(headers), tablefmt="simple", disable_numparse=True)


def quiet_libraries() -> None:
    """Silence transformers / hub progress bars and warnings: seqtool reports on its own."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "transformers" not in sys.modules:
        return  # it reads the variables above when a command imports it; importing it here costs ~0.5 s
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def handle_errors(fn: Callable) -> Callable:
    """Turn a SeqtoolError (and a few known library errors) into one line on stderr and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SeqtoolError as exc:
            if os.environ.get("SEQTOOL_DEBUG") == "1":
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except MemoryError:
            if os.environ.get("SEQTOOL_DEBUG") == "1":
                raise
            typer.echo("error: out of memory; try a shorter --seq-len, a smaller --batch or --dtype bf16", err=True)
            raise typer.Exit(1) from None

    return wrapper


def _hide_flag_placeholder() -> None:
    """Typer's rich help shows ``<bool>`` beside every flag (``--force <bool>``) although a flag takes no value."""
    from typer.core import TyperOption

    original = TyperOption.display_type_rich
    if getattr(original, "_seqtool", False):
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else original(self, ctx)

    display_type_rich._seqtool = True
    TyperOption.display_type_rich = display_type_rich


_hide_flag_placeholder()


class OneLineErrorsGroup(typer.core.TyperGroup):
    """Usage errors (``--ratio abc``, a missing option) as one ``error:`` line plus a help hint, exit 2,
    instead of a boxed multi-line panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:  # typer >= 0.2x vendors click as typer._click
            from typer import _click as click
        except ImportError:  # pragma: no cover
            import click

        from seqtool.cli import project

        try:  # [tool.seqtool] model/device/dtype of ./pyproject.toml or ./seqtool.toml (see seqtool.cli.project)
            extra.setdefault("default_map", project.default_map(self.commands))
        except SeqtoolError as exc:
            typer.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.exceptions.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            if isinstance(exc, click.exceptions.MissingParameter) and getattr(exc.param, "name", None) == "model":
                typer.echo(f"error: {project.missing_model_message()}", err=True)
                sys.exit(2)
            typer.echo(f"error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)
