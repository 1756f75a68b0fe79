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
AttnOpt = Annotated[str | None, typer.Option("--attn", help="Attention: sdpa|eager or a seqtool patch spec, e.g. block_topk:budget=0.25,min_len=0.", show_default=False)]

_state = {"quiet": False}


def set_quiet(quiet: bool) -> None:
    _state["quiet"] = quiet


def is_quiet() -> bool:
    return _state["quiet"]


def log(message: str) -> None:
    """A log line on stderr (suppressed by --quiet)."""
    if not _state["quiet"]:
        print(message, file=sys.stderr, flush=True)


def progress_enabled() -> bool:
    return not _state["quiet"] and sys.stderr.isatty()


@contextmanager
def progress(description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr when it is a terminal; yields ``advance(n=1)``."""
    if not progress_enabled():
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


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
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers always importable here
        pass


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
