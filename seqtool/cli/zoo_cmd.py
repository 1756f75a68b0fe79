"""`seqtool zoo train-ref`: train (or resume) the reference model and export it."""
from __future__ import annotations

from typing import Annotated

import typer

from seqtool.cli.common import JsonOpt, emit, handle_errors, table

zoo_app = typer.Typer(help="Built-in models: train the reference model `ref`; save a preset to disk.", no_args_is_help=True)


def render(result) -> str:
    rows = [("run dir", result.run_dir), ("steps", result.steps), ("tokens", result.tokens),
            ("seconds (this call)", result.seconds)]
    rows += [(f"loss {k}", f"{v:.4f}") for k, v in result.last_loss.items()]
    if result.exported:
        rows.append(("exported to", result.exported))
    return table(rows, ["train-ref", "value"])


def register(app: typer.Typer) -> None:
    @zoo_app.command("train-ref")
    @handle_errors
    def train_ref_command(
        run_dir: Annotated[str, typer.Option("--run-dir", help="Checkpoint and log directory; resumes when it holds checkpoint.pt.")],
        tiny: Annotated[bool, typer.Option("--tiny", help="Seconds-long configuration (CI smoke test).")] = False,
        max_steps: Annotated[int | None, typer.Option("--max-steps", help="Stop after this many steps in this call.")] = None,
        export: Annotated[str | None, typer.Option("--export", help="After training, export the checkpoint (bf16 HF dir) here.")] = None,
        init_from: Annotated[str | None, typer.Option("--init-from", help="Train a later stage starting from this exported model (see --stage).", show_default=False)] = None,
        stage: Annotated[str, typer.Option("--stage", help="With --init-from: 'retrieval' (stage 2, from the stage-1 export) or 'multikey' (stage 3, from the stage-2 export).")] = "retrieval",
        json_out: JsonOpt = False,
    ) -> None:
        """Train the reference model from the stdlib sources plus synthetic retrieval samples (CPU, resumable).

        Examples:
          seqtool zoo train-ref --run-dir runs/ref --export seqtool/zoo/ref
          seqtool zoo train-ref --run-dir runs/ref-s2 --init-from runs/ref-s1-export --export runs/ref-s2-export
          seqtool zoo train-ref --run-dir runs/ref-s3 --init-from runs/ref-s2-export --stage multikey --export seqtool/zoo/ref
          seqtool zoo train-ref --run-dir /tmp/ci --tiny --max-steps 2
        """
        from seqtool.zoo.train_ref import run

        emit(run(run_dir, tiny=tiny, max_steps=max_steps, export_dir=export, init_from=init_from,
                 stage=stage), json_out, render)

    @zoo_app.command("save")
    @handle_errors
    def save_command(
        preset: Annotated[str, typer.Argument(help="Random-weight preset: tiny-llama, llama-3.2-1b, llama-3.1-8b, ...", show_default=False)],
        output: Annotated[str, typer.Option("--output", "-o", help="Output checkpoint directory.")],
        dtype: Annotated[str, typer.Option("--dtype", help="auto (fp32 for tiny presets, bf16 for real-shape ones) | fp32 | bf16 | fp16.")] = "auto",
        max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest safetensors shard, e.g. 2GB, 500MiB.")] = "2GB",
        seed: Annotated[int, typer.Option("--seed", help="Weight seed (each tensor's values depend on it and the tensor's name).")] = 0,
        force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Write a random-weight preset to disk shard by shard, never holding the model in memory (docs/big_models.md).

        Examples:
          seqtool zoo save llama-3.1-8b -o /data/llama8b-random
          seqtool zoo save tiny-llama -o tl --max-shard-size 100KB
        """
        from seqtool.arch.offload import parse_size
        from seqtool.cli.common import check_output, progress
        from seqtool.zoo.presets import is_preset, preset_names

        if not is_preset(preset) or preset == "ref":
            from seqtool.errors import BadInputError

            raise BadInputError(f"unknown preset '{preset}'; presets: {', '.join(p for p in preset_names() if p != 'ref')}")
        shard = parse_size(max_shard_size, "--max-shard-size")
        check_output(preset, output, in_place=False, force=force)
        from seqtool.zoo.save import save_preset

        with progress(f"writing {preset}") as advance:
            result = save_preset(preset, output, dtype=dtype, seed=seed, max_shard_bytes=shard, force=force,
                                 progress=lambda done, total: advance(1))
        emit(result, json_out, lambda r: table([(k, v) for k, v in vars(r).items()], ["zoo save", "value"]))

    app.add_typer(zoo_app, name="zoo")
