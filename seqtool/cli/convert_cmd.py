"""`seqtool convert MODEL --to gqa --kv-heads N -o OUT`: structural conversions (see seqtool.convert)."""
from __future__ import annotations

from typing import Annotated

import typer

from seqtool.cli.common import (DeviceOpt, DtypeOpt, ForceOpt, InPlaceOpt, JsonOpt, ModelArg, OutputOpt, check_model,
                                check_output, emit, handle_errors, is_quiet, table, working)
from seqtool.cli.dry_run import DryRunOpt
from seqtool.cli.common import DeviceMapOpt, MaxMemoryOpt, MaxShardOpt, StreamOpt, offload_option
from seqtool.errors import BadInputError
from seqtool.utils import format_bytes, format_count

CalibOpt = Annotated[str | None, typer.Option("--calib", help="Calibration text file (default: built-in text).", show_default=False)]
SamplesOpt = Annotated[int, typer.Option("--samples", help="Calibration windows.")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per calibration window.")]
RecoverOpt = Annotated[str | None, typer.Option("--recover", help="Recovery training after converting, merged into the weights: lora (LoRA r=8 on every attention + MLP projection, LM loss, 100 steps x 4 x 256 tokens) | full (all weights of the modules the conversion changed: gqa attention, prune attention + MLP; LM loss, 100 x 4 x 256) | distill (those modules, KL + attention-output matching to the original model on text + 30 % retrieval rows; 300 steps x 8 x 512 then 100 x 2 x 2048, bf16 autocast).", show_default=False)]
StepsOpt = Annotated[int | None, typer.Option("--steps", help="Recovery steps (default per --recover mode).", show_default=False)]
RunDirOpt = Annotated[str | None, typer.Option("--run-dir", help="Checkpoints + log of the training (recovery; hybrid: its two stages, default OUT.run), resumable with --resume.", show_default=False)]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the training run in --run-dir (recovery or hybrid stages).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for calibration windows, random scores and recovery.")]
# moe / bam (upcycling seeds into experts; see docs/moe.md)
FromOpt = Annotated[str | None, typer.Option("--from", help="moe/bam: further seed checkpoints, comma-separated (MODEL is the first).", show_default=False)]
ExpertsOpt = Annotated[int | None, typer.Option("--experts", help="moe/bam: experts per layer (default: number of seeds; seeds repeat cyclically).", show_default=False)]
TopKOpt = Annotated[int | None, typer.Option("--top-k", help="moe/bam: FFN experts per token (default 2, 1 with one expert).", show_default=False)]
RouterOpt = Annotated[str, typer.Option("--router", help="moe/bam: router init: random | hidden (seeds' mean hidden states on their data).")]
RouterDataOpt = Annotated[str | None, typer.Option("--router-data", help="moe/bam --router hidden: text file(s), one per seed, comma-separated (default --calib or built-in text).", show_default=False)]
AttnExpertsOpt = Annotated[str, typer.Option("--attention-experts", help="bam: full (q/k/v/o per expert) | kv-shared (q/o per expert, one K/V).")]
ParallelOpt = Annotated[bool, typer.Option("--parallel", help="bam: parallel attention + FFN block.")]


# The registered conversions' names (seqtool.convert.available(); a test keeps them equal), so that a mistyped
# --to is answered without importing torch.
CONVERSION_NAMES = ("bam", "gqa", "hybrid", "moe", "prune")


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
    change = "removed" if result.removed_ratio >= 0 else "added"
    lines.append(f"{result.op} ({result.method}) of {result.source} [{result.family}]: "
                 f"{100 * abs(result.removed_ratio):.2f} % of attention + MLP parameters {change}")
    if result.recovery is not None:
        r = result.recovery
        what = f"LoRA r={r.rank}" if r.method == "lora" else f"{r.method} ({','.join(r.target_modules)})"
        lines.append(f"recovery: {what}, {r.steps} steps, loss {r.loss_start:.3f} -> {r.loss_end:.3f}"
                     + (f", held-out ppl {r.heldout_ppl_before:.2f} -> {r.heldout_ppl_after:.2f}"
                        if r.heldout_ppl_after is not None else "")
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
        to: Annotated[str, typer.Option("--to", help="Conversion: gqa | hybrid | moe | bam.")],
        output: OutputOpt = None,
        kv_heads: Annotated[int | None, typer.Option("--kv-heads", help="gqa: new KV-head count (divides the current one).", show_default=False)] = None,
        grouping: Annotated[str, typer.Option("--grouping", help="gqa: mean (contiguous groups, mean-pooled) | key (calibrated grouping, norm-aware pooling).")] = "mean",
        # --- hybrid options (convert --to hybrid) ---
        mixer: Annotated[str, typer.Option("--mixer", help="hybrid: mixer replacing attention: mamba2 | linear | deltanet.")] = "mamba2",
        attention_layers: Annotated[str | None, typer.Option("--attention-layers", help="hybrid: layers kept as attention, e.g. 0,3 (default: by retrieval score).", show_default=False)] = None,
        keep_attention: Annotated[float | None, typer.Option("--keep-attention", help="hybrid: fraction of layers kept as attention, highest retrieval scores first (default 0.25).", show_default=False)] = None,
        steps1: Annotated[int | None, typer.Option("--steps1", help="hybrid: stage-1 steps (attention transfer: only the new mixers train; 0 skips; default 60).", show_default=False)] = None,
        steps2: Annotated[int | None, typer.Option("--steps2", help="hybrid: stage-2 steps (KL + per-layer attention-output matching to the original; mixers + LoRA on the rest; the last quarter (linear: half) at 2 x 2048 tokens; 0 skips; default 300).", show_default=False)] = None,
        lora_r: Annotated[int | None, typer.Option("--lora-r", help="hybrid: LoRA rank of stage 2 (default 8).", show_default=False)] = None,
        data: Annotated[str | None, typer.Option("--data", help="hybrid: training text (as seqtool finetune; default built-in corpus; --mix-retrieval adds synthetic retrieval rows).", show_default=False)] = None,
        mix_retrieval: Annotated[float | None, typer.Option("--mix-retrieval", help="hybrid: share of synthetic retrieval rows in the training data (default 0.3; 0 for none).", show_default=False)] = None,
        window: Annotated[int | None, typer.Option("--window", help="hybrid, --mixer linear: tokens of softmax attention kept beside the linear attention (default 64).", show_default=False)] = None,
        # --- end hybrid options ---
        calib: CalibOpt = None,
        samples: SamplesOpt = 50,
        seq_len: Annotated[int | None, typer.Option("--seq-len", help="Tokens per calibration window (default 128); hybrid: tokens per training row (default 512).", show_default=False)] = None,
        recover: RecoverOpt = None,
        steps: StepsOpt = None,
        run_dir: RunDirOpt = None,
        resume: ResumeOpt = False,
        seed: SeedOpt = 0,
        from_: FromOpt = None,
        experts: ExpertsOpt = None,
        top_k: TopKOpt = None,
        router: RouterOpt = "random",
        router_data: RouterDataOpt = None,
        attention_experts: AttnExpertsOpt = "full",
        parallel: ParallelOpt = False,
        force: ForceOpt = False,
        in_place: InPlaceOpt = False,
        dtype: DtypeOpt = "auto",
        device: DeviceOpt = "auto",
        stream: StreamOpt = None,
        max_shard_size: MaxShardOpt = "2GB",
        device_map: DeviceMapOpt = None,
        max_memory: MaxMemoryOpt = None,
        json_out: JsonOpt = False,
        dry_run: DryRunOpt = False,
    ) -> None:
        """Rewrite a checkpoint's structure; the output loads with plain transformers.

        Examples:
          seqtool convert ref --to gqa --kv-heads 2 -o ref-gqa2
          seqtool convert ./llama --to gqa --kv-heads 4 --grouping key --calib notes.txt -o ./llama-gqa4
          seqtool convert ref --to gqa --kv-heads 2 --recover distill --run-dir run-gqa2 -o ref-gqa2-distill
          seqtool convert ./code-branch --from ./prose-branch --to moe --router hidden -o ./mixed-moe
          seqtool convert ref --to bam --experts 2 --attention-experts kv-shared -o ref-bam
          seqtool convert ref --to hybrid --mixer mamba2 --keep-attention 0.5 -o ref-hybrid
          seqtool convert ./llama --to hybrid --attention-layers 0,3 -o ./llama-hybrid
          seqtool convert ./llama-8b --to gqa --kv-heads 4 --stream --max-shard-size 1GB -o ./llama-8b-gqa4
        """
        check_model(model)  # validation follows the command line: model, --to, options, output
        if to not in CONVERSION_NAMES:
            raise BadInputError(f"unknown conversion '{to}'; available: {', '.join(CONVERSION_NAMES)}")
        from seqtool.convert import convert
        from seqtool.convert.pipeline import make_conversion

        options = {}
        if to == "gqa":
            options = {"kv_heads": kv_heads, "grouping": grouping}
        if to in ("moe", "bam"):
            options = {"from_": from_, "experts": experts, "top_k": top_k, "router": router, "router_data": router_data}
            if to == "bam":
                options.update(attention_experts=attention_experts, parallel=parallel)
        if to == "prune":
            raise BadInputError("pruning has its own command: seqtool prune MODEL --ratio R -o OUT")
        if dry_run:
            from seqtool.cli.dry_run import print_plan

            return print_plan(model, "convert", dict(to=to, **options, calib=calib, samples=samples, seq_len=seq_len,
                                                     recover=recover, steps=steps), device=device, dtype=dtype,
                              json_out=json_out)
        if to == "hybrid":
            # Unset options keep the library's defaults (seqtool.convert.hybrid), the recipe behind the docs' numbers.
            given = {"steps1": steps1, "steps2": steps2, "lora_r": lora_r, "train_seq_len": seq_len, "window": window,
                     "mix_retrieval": mix_retrieval}
            options = {"mixer": mixer, "attention_layers": attention_layers, "keep_attention": keep_attention,
                       "data": data, **{k: v for k, v in given.items() if v is not None}}
        make_conversion(to, options)  # unknown --to, missing options: one line, before loading anything
        if recover not in (None, "none", "lora", "full", "distill"):
            raise BadInputError(f"unknown --recover '{recover}'; use lora, full or distill, or leave it out")
        out = resolve_output(model, output, in_place, force)
        if to == "hybrid" and run_dir is None and not (steps1 == 0 and steps2 == 0):
            run_dir = f"{str(out).rstrip('/')}.run"  # the two distillation stages' checkpoints
        with working(f"converting {model} -> {to}"), offload_option(device_map, max_memory, model):
            result = convert(model, to, output=out, calib=calib, samples=samples, seq_len=seq_len or 128, seed=seed,
                             recover=recover, steps=steps, run_dir=run_dir, resume=resume,
                             progress="off" if is_quiet() else "auto", force=force, in_place=in_place, dtype=dtype,
                             device=device, stream=stream, max_shard_size=max_shard_size, **options)
        emit(result, json_out, render)
