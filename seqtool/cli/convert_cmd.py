"""`seqtool convert MODEL --to gqa --kv-heads N -o OUT`: structural conversions (see seqtool.convert)."""
from __future__ import annotations

from typing import Annotated

import typer

from seqtool.cli.common import (DeviceOpt, DtypeOpt, ForceOpt, InPlaceOpt, JsonOpt, ModelArg, OutputOpt, check_model,
                                check_output, emit, handle_errors, table, working)
from seqtool.errors import BadInputError
from seqtool.utils import format_bytes, format_count

CalibOpt = Annotated[str | None, typer.Option("--calib", help="Calibration text file (default: built-in text).", show_default=False)]
SamplesOpt = Annotated[int, typer.Option("--samples", help="Calibration windows.")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per calibration window.")]
RecoverOpt = Annotated[str | None, typer.Option("--recover", help="Recovery fine-tune after converting: lora.", show_default=False)]
StepsOpt = Annotated[int, typer.Option("--steps", help="Recovery fine-tune steps (batch 4 x 256 tokens).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for calibration windows, random scores and recovery.")]


def resolve_output(model: str, output: str | None, in_place: bool, force: bool = False) -> str:
    """The directory to write (``-o``, or the input itself with ``--in-place``), checked before any work."""
    if output is None and not in_place:
        raise BadInputError("pass -o OUT (output directory) or --in-place")
    return check_output(model, output, in_place=in_place, force=force)


def render(result) -> str:
    b, a = result.before, result.after
    rows = [
        ("heads / KV heads", f"{b.heads} / {b.kv_heads}", f"{a.heads} / {a.kv_heads}"),
        ("head_dim", b.head_dim, a.head_dim),
        ("intermediate", b.intermediate, a.intermediate),
        ("attention + MLP params", format_count(b.params_attn_mlp), format_count(a.params_attn_mlp)),
        ("total params", format_count(b.params_total), format_count(a.params_total)),
        ("KV cache per token", format_bytes(b.kv_cache_bytes_per_token), format_bytes(a.kv_cache_bytes_per_token)),
    ]
    lines = [table(rows, ["", "before", "after"]), ""]
    lines.append(f"{result.op} ({result.method}) of {result.source} [{result.family}]: "
                 f"{100 * result.removed_ratio:.2f} % of attention + MLP parameters removed")
    if result.recovery is not None:
        r = result.recovery
        lines.append(f"recovery: LoRA r={r.rank}, {r.steps} steps, loss {r.loss_start:.3f} -> {r.loss_end:.3f}"
                     + (f", adapter {r.adapter_dir}" if r.adapter_dir else ""))
    lines.append(f"saved: {result.output}" if result.output else "not saved (no output given)")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    @app.command("convert")
    @handle_errors
    def convert_command(
        model: ModelArg,
        to: Annotated[str, typer.Option("--to", help="Conversion: gqa.")],
        output: OutputOpt = None,
        kv_heads: Annotated[int | None, typer.Option("--kv-heads", help="gqa: new KV-head count (divides the current one).", show_default=False)] = None,
        grouping: Annotated[str, typer.Option("--grouping", help="gqa: mean (contiguous groups, mean-pooled) | key (calibrated grouping, norm-aware pooling).")] = "mean",
        calib: CalibOpt = None,
        samples: SamplesOpt = 50,
        seq_len: SeqLenOpt = 128,
        recover: RecoverOpt = None,
        steps: StepsOpt = 100,
        seed: SeedOpt = 0,
        force: ForceOpt = False,
        in_place: InPlaceOpt = False,
        dtype: DtypeOpt = "auto",
        device: DeviceOpt = "auto",
        json_out: JsonOpt = False,
    ) -> None:
        """Rewrite a checkpoint's structure; the output loads with plain transformers.

        Examples:
          seqtool convert ref --to gqa --kv-heads 2 -o ref-gqa2
          seqtool convert ./llama --to gqa --kv-heads 4 --grouping key --calib notes.txt -o ./llama-gqa4
        """
        check_model(model)  # validation follows the command line: model, --to, options, output
        from seqtool.convert import convert
        from seqtool.convert.base import make_conversion

        options = {}
        if to == "gqa":
            options = {"kv_heads": kv_heads, "grouping": grouping}
        if to == "prune":
            raise BadInputError("pruning has its own command: seqtool prune MODEL --ratio R -o OUT")
        make_conversion(to, options)  # unknown --to, missing options: one line, before loading anything
        if recover not in (None, "none", "lora"):
            raise BadInputError(f"unknown --recover '{recover}'; use lora or leave it out")
        out = resolve_output(model, output, in_place, force)
        with working(f"converting {model} -> {to}"):
            result = convert(model, to, output=out, calib=calib, samples=samples, seq_len=seq_len, seed=seed,
                             recover=recover, steps=steps, force=force, in_place=in_place, dtype=dtype, device=device,
                             **options)
        emit(result, json_out, render)
