"""`seqtool patch MODEL --method M [--budget B] [--dense-layers 0,1] [--set k=v ...] -o OUT [--report]`."""
from __future__ import annotations

from typing import Annotated

import typer

from seqtool.cli.common import (DeviceOpt, DtypeOpt, ForceOpt, InPlaceOpt, JsonOpt, ModelArg, OutputOpt, check_model,
                                check_output, emit, handle_errors, table, working)
from seqtool.cli.common import DeviceMapOpt, MaxMemoryOpt, offload_option
from seqtool.errors import BadInputError


def render(result) -> str:
    lines = []
    rep = result.report
    if rep is not None:
        rows = [(h.layer, h.head, h.method, f"{100 * h.recall_answer:.1f} %", f"{100 * h.mass_kept:.1f} %",
                 f"{100 * h.keys_computed:.1f} %") for h in rep.heads]
        lines += [table(rows, ["layer", "head", "method", "recall (answer)", "recall (all)", "keys computed"]), "",
                  f"probe: {rep.probe_tokens}-token {rep.probe} prompt, min_len={rep.min_len}; overall: "
                  f"{100 * rep.recall_answer:.1f} % of the dense attention mass kept on the answer queries, "
                  f"{100 * rep.mass_kept:.1f} % on all queries, "
                  f"{100 * rep.keys_computed:.1f} % of causal key positions computed (measured)"]
        if rep.answer is not None:
            lines.append(f"passkey {rep.answer}: the patched model answered {rep.generated.strip()!r}")
    lines.append(f"patch: {result.spec}")
    lines.append(f"saved: {result.output} (seqtool.load re-applies the patch; plain transformers runs dense)"
                 if result.output else "not saved (no output given)")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    @app.command("patch")
    @handle_errors
    def patch_command(
        model: ModelArg,
        method: Annotated[str, typer.Option("--method", "-m", help="dense|streaming|block_topk|vertical_slash|recycled|... (see seqtool.patches.list_methods()).")],
        budget: Annotated[str | None, typer.Option("--budget", help="Causal keys per query: ratio in (0, 1] (1 = full; 50% accepted), whole number of keys >= 2, or 'full'.", show_default=False)] = None,
        dense_layers: Annotated[str | None, typer.Option("--dense-layers", help="Layers that stay dense, e.g. 0,1.", show_default=False)] = None,
        set_: Annotated[list[str] | None, typer.Option("--set", help="Method option key=value (repeatable), e.g. --set min_len=0 --set block=64.", show_default=False)] = None,
        output: OutputOpt = None,
        report: Annotated[bool, typer.Option("--report", help="Per layer/head: attention recall (dense attention mass kept) on the answer queries and on all queries of a passkey probe, and keys computed.")] = False,
        probe_tokens: Annotated[int, typer.Option("--probe-tokens", help="--report probe length.")] = 512,
        force: ForceOpt = False,
        in_place: InPlaceOpt = False,
        dtype: DtypeOpt = "auto",
        device: DeviceOpt = "auto",
        device_map: DeviceMapOpt = None,
        max_memory: MaxMemoryOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Write a checkpoint that runs a training-free sparse attention patch when loaded with seqtool.

        Examples:
          seqtool patch ref --method block_topk --budget 0.25 --set min_len=0 -o ref-bt
          seqtool patch ref --method streaming --budget 256 --dense-layers 0 --report --probe-tokens 2048
        """
        check_model(model)
        if output is None and not in_place and not report:
            raise BadInputError("pass -o OUT (output directory), --in-place, or --report")
        check_output(model, output, in_place=in_place, force=force)
        from seqtool.patches.checkpoint import patch_checkpoint

        with offload_option(device_map, max_memory, model), working(f"patching {model} with {method}"):
            result = patch_checkpoint(model, method, budget=budget, dense_layers=dense_layers, set_options=set_,
                                      output=output, force=force, in_place=in_place, report=report,
                                      probe_tokens=probe_tokens, dtype=dtype, device=device)
        emit(result, json_out, render)
