"""`seqtool convert MODEL --to gqa --kv-heads N -o OUT`: structural conversions (see seqtool.convert)."""
from __future__ import annotations

from typing import Annotated

import typer

from seqtool.cli.common import (DeviceOpt, DtypeOpt, ForceOpt, InPlaceOpt, JsonOpt, ModelArg, OutputOpt, emit,
                                handle_errors, log, table)
from seqtool.errors import BadInputError
from seqtool.utils import format_bytes, format_count

CalibOpt = Annotated[str | None, typer.Option("--calib", help="Calibration text file (default: built-in text).", show_default=False)]
SamplesOpt = Annotated[int, typer.Option("--samples", help="Calibration windows.")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per calibration window.")]
RecoverOpt = Annotated[str | None, typer.Option("--recover", help="Recovery fine-tune after converting: lora.", show_default=False)]
StepsOpt = Annotated[int, typer.Option("--steps", help="Recovery fine-tune steps (batch 4 x 256 tokens).")]
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
        lines.append(f"recovery: LoRA r={r.rank}, {r.steps} steps, loss {r.loss_start:.3f} -> {r.loss_end:.3f}"
                     + (f", adapter {r.adapter_dir}" if r.adapter_dir else ""))
    choice = result.details.get("layer_choice") if isinstance(result.details, dict) else None
    if choice:
        scores = result.details.get("retrieval_scores")
        kept = result.details.get("attention_layers_kept", [])
        if scores:
            lines.append("retrieval score per layer: " + ", ".join(
                f"{i}:{s:.3f}{'*' if i in kept else ''}" for i, s in enumerate(scores)) + " (* kept as attention)")
        lines.append(f"attention layers kept: {kept} ({choice}); {result.details.get('mixer')} in "
                     f"{result.details.get('converted_layers')} -> {result.details.get('model_class')}")
    lines.append(f"saved: {result.output}" if result.output else "not saved (no output given)")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    @app.command("convert")
    @handle_errors
    def convert_command(
        model: ModelArg,
        to: Annotated[str, typer.Option("--to", help="Conversion: gqa | hybrid.")],
        output: OutputOpt = None,
        kv_heads: Annotated[int | None, typer.Option("--kv-heads", help="gqa: new KV-head count (divides the current one).", show_default=False)] = None,
        grouping: Annotated[str, typer.Option("--grouping", help="gqa: mean (contiguous groups, mean-pooled) | key (calibrated grouping, norm-aware pooling).")] = "mean",
        # --- hybrid options (convert --to hybrid) ---
        mixer: Annotated[str, typer.Option("--mixer", help="hybrid: mixer replacing attention: mamba2 | linear | deltanet.")] = "mamba2",
        attention_layers: Annotated[str | None, typer.Option("--attention-layers", help="hybrid: layers kept as attention, e.g. 0,3 (default: by retrieval score).", show_default=False)] = None,
        keep_attention: Annotated[float | None, typer.Option("--keep-attention", help="hybrid: fraction of layers kept as attention, highest retrieval scores first (default 0.25).", show_default=False)] = None,
        steps1: Annotated[int | None, typer.Option("--steps1", help="hybrid: stage-1 steps (attention transfer: only the new mixers train; 0 skips; default 100).", show_default=False)] = None,
        steps2: Annotated[int | None, typer.Option("--steps2", help="hybrid: stage-2 steps (KL to the original; mixers + LoRA on the rest; 0 skips; default 200).", show_default=False)] = None,
        lora_r: Annotated[int | None, typer.Option("--lora-r", help="hybrid: LoRA rank of stage 2 (default 8).", show_default=False)] = None,
        data: Annotated[str | None, typer.Option("--data", help="hybrid: training text (as seqtool finetune; default built-in corpus).", show_default=False)] = None,
        run_dir: Annotated[str | None, typer.Option("--run-dir", help="hybrid: checkpoints + loss logs of the two stages (default OUT.run).", show_default=False)] = None,
        resume: Annotated[bool, typer.Option("--resume", help="hybrid: continue a killed conversion from --run-dir.")] = False,
        # --- end hybrid options ---
        calib: CalibOpt = None,
        samples: SamplesOpt = 50,
        seq_len: Annotated[int | None, typer.Option("--seq-len", help="Tokens per calibration window (default 128); hybrid: tokens per training row (default 256).", show_default=False)] = None,
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
          seqtool convert ref --to hybrid --mixer mamba2 --keep-attention 0.5 -o ref-hybrid
          seqtool convert ./llama --to hybrid --attention-layers 0,3 -o ./llama-hybrid
        """
        from seqtool.convert import convert

        options = {}
        if to == "gqa":
            if kv_heads is None:
                raise BadInputError("--to gqa needs --kv-heads N")
            options = {"kv_heads": kv_heads, "grouping": grouping}
        out = resolve_output(model, output, in_place)
        if to == "hybrid":
            # Unset options keep the library's defaults (seqtool.convert.hybrid), the recipe behind the docs' numbers.
            given = {"steps1": steps1, "steps2": steps2, "lora_r": lora_r, "train_seq_len": seq_len}
            options = {"mixer": mixer, "attention_layers": attention_layers, "keep_attention": keep_attention,
                       "data": data, "resume": resume, **{k: v for k, v in given.items() if v is not None}}
            trains = not (steps1 == 0 and steps2 == 0)
            options["run_dir"] = run_dir or (f"{out.rstrip('/')}.run" if trains else None)
        log(f"converting {model} -> {to} ...")
        result = convert(model, to, output=out, calib=calib, samples=samples, seq_len=seq_len or 128, seed=seed,
                         recover=recover, steps=steps, force=force, in_place=in_place, dtype=dtype, device=device,
                         **options)
        emit(result, json_out, render)
