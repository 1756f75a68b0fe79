"""`seqtool convert MODEL --to gqa --kv-heads N -o OUT`: structural conversions (see seqtool.convert)."""
from __future__ import annotations

from typing import Annotated

import typer

from seqtool.cli.common import (DeviceOpt, DtypeOpt, ForceOpt, InPlaceOpt, JsonOpt, ModelArg, OutputOpt, emit,
                                handle_errors, is_quiet, log, table)
from seqtool.errors import BadInputError
from seqtool.utils import format_bytes, format_count

CalibOpt = Annotated[str | None, typer.Option("--calib", help="Calibration text file (default: built-in text).", show_default=False)]
SamplesOpt = Annotated[int, typer.Option("--samples", help="Calibration windows.")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per calibration window.")]
RecoverOpt = Annotated[str | None, typer.Option("--recover", help="Recovery training after converting, merged into the weights: lora (LoRA r=8 on every attention + MLP projection, LM loss, 100 steps x 4 x 256 tokens) | full (all weights of the modules the conversion changed: gqa attention, prune attention + MLP; LM loss, 100 x 4 x 256) | distill (those modules, KL + attention-output matching to the original model on text + 30 % retrieval rows; 300 steps x 8 x 512 then 100 x 2 x 2048, bf16 autocast).", show_default=False)]
StepsOpt = Annotated[int | None, typer.Option("--steps", help="Recovery steps (default per --recover mode).", show_default=False)]
RunDirOpt = Annotated[str | None, typer.Option("--run-dir", help="Recovery checkpoints + log (resumable with --resume).", show_default=False)]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the recovery run in --run-dir.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for calibration windows, random scores and recovery.")]


def resolve_output(model: str, output: str | None, in_place: bool) -> str:
    """The directory to write: ``-o``, or the input itself with ``--in-place``."""
    if output is None and in_place:
        return model
    if output is None:
        raise BadInputError("pass -o OUT (output directory) or --in-place")
    return output


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
        what = f"LoRA r={r.rank}" if r.method == "lora" else f"{r.method} ({','.join(r.target_modules)})"
        lines.append(f"recovery: {what}, {r.steps} steps, loss {r.loss_start:.3f} -> {r.loss_end:.3f}"
                     + (f", held-out ppl {r.heldout_ppl_before:.2f} -> {r.heldout_ppl_after:.2f}"
                        if r.heldout_ppl_after is not None else "")
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
        steps: StepsOpt = None,
        run_dir: RunDirOpt = None,
        resume: ResumeOpt = False,
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
          seqtool convert ref --to gqa --kv-heads 2 --recover distill --run-dir run-gqa2 -o ref-gqa2-distill
        """
        from seqtool.convert import convert

        options = {}
        if to == "gqa":
            if kv_heads is None:
                raise BadInputError("--to gqa needs --kv-heads N")
            options = {"kv_heads": kv_heads, "grouping": grouping}
        out = resolve_output(model, output, in_place)
        log(f"converting {model} -> {to} ...")
        result = convert(model, to, output=out, calib=calib, samples=samples, seq_len=seq_len, seed=seed,
                         recover=recover, steps=steps, run_dir=run_dir, resume=resume,
                         progress="off" if is_quiet() else "auto", force=force, in_place=in_place, dtype=dtype, device=device,
                         **options)
        emit(result, json_out, render)
