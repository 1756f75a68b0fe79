"""`seqtool prune MODEL --ratio 0.3 -o OUT`: AMP structured pruning of attention heads and MLP channels."""
from __future__ import annotations

from typing import Annotated

import typer

from seqtool.cli.common import (DeviceOpt, DtypeOpt, ForceOpt, InPlaceOpt, JsonOpt, ModelArg, OutputOpt, check_model,
                                emit, handle_errors, is_quiet, working)
from seqtool.cli.dry_run import DryRunOpt
from seqtool.cli.common import DeviceMapOpt, MaxMemoryOpt, MaxShardOpt, StreamOpt, offload_option
from seqtool.errors import BadInputError
from seqtool.cli.convert_cmd import (CalibOpt, RecoverOpt, ResumeOpt, RunDirOpt, SamplesOpt, SeedOpt, SeqLenOpt,
                                     StepsOpt, render, resolve_output)


def register(app: typer.Typer) -> None:
    @app.command("prune")
    @handle_errors
    def prune_command(
        model: ModelArg,
        ratio: Annotated[float, typer.Option("--ratio", help="Fraction of attention + MLP parameters to remove, in [0, 1).")],
        output: OutputOpt = None,
        target: Annotated[str, typer.Option("--target", help="What to prune: heads,mlp | heads | mlp.")] = "heads,mlp",
        criterion: Annotated[str, typer.Option("--criterion", help="amp (calibrated contributions) | magnitude | random.")] = "amp",
        round_to: Annotated[int | None, typer.Option("--round-to", help="Keep the intermediate size a multiple of this.", show_default=False)] = None,
        gqa_unit: Annotated[str, typer.Option("--gqa-unit", help="GQA models: query (same number of query heads from every group) | group (whole KV groups).")] = "query",
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
        stream: StreamOpt = None,
        max_shard_size: MaxShardOpt = "2GB",
        device_map: DeviceMapOpt = None,
        max_memory: MaxMemoryOpt = None,
        json_out: JsonOpt = False,
        dry_run: DryRunOpt = False,
    ) -> None:
        """Remove the least important heads and MLP channels, the same number in every layer.

        Examples:
          seqtool prune ref --ratio 0.3 -o ref-pruned
          seqtool prune ./llama --ratio 0.2 --round-to 64 --recover lora --steps 200 -o ./llama-p20
          seqtool prune ./llama-8b --ratio 0.2 --stream --max-memory cpu=4GB -o ./llama-8b-p20
        """
        check_model(model)
        if ratio == 0:
            raise BadInputError("--ratio 0 removes nothing (the output would be an unchanged copy); use a ratio in (0, 1)")
        if not 0 < ratio < 1:
            raise BadInputError(f"--ratio must be in (0, 1), got {ratio:g}")
        if recover not in (None, "none", "lora", "full", "distill"):
            raise BadInputError(f"unknown --recover '{recover}'; use lora, full or distill, or leave it out")
        if dry_run:
            from seqtool.cli.dry_run import print_plan

            return print_plan(model, "prune", dict(ratio=ratio, target=target, criterion=criterion, round_to=round_to,
                                                   gqa_unit=gqa_unit, calib=calib, samples=samples, seq_len=seq_len,
                                                   recover=recover, steps=steps), device=device, dtype=dtype,
                              json_out=json_out)
        out = resolve_output(model, output, in_place, force)
        from seqtool.convert.pipeline import prune_model

        with working(f"pruning {ratio:g} of {model} ({criterion})"), offload_option(device_map, max_memory, model):
            result = prune_model(model, ratio, output=out, target=target, criterion=criterion, round_to=round_to,
                                 gqa_unit=gqa_unit, calib=calib, samples=samples, seq_len=seq_len, seed=seed,
                                 recover=recover, steps=steps, run_dir=run_dir, resume=resume,
                                 progress="off" if is_quiet() else "auto", force=force, in_place=in_place,
                                 dtype=dtype, device=device, stream=stream, max_shard_size=max_shard_size)
        emit(result, json_out, render)
