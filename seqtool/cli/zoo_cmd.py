"""`seqtool zoo train-ref`: train (or resume) the reference model and export it."""
from __future__ import annotations

from typing import Annotated

import typer

from seqtool.cli.common import JsonOpt, emit, handle_errors, table

zoo_app = typer.Typer(help="Built-in models: train the reference model `ref`.", no_args_is_help=True)


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

    app.add_typer(zoo_app, name="zoo")
