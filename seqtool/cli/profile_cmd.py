"""`seqtool profile MODEL`: prefill / decode latency, peak memory, KV-cache bytes and FLOPs per length."""
from __future__ import annotations

from typing import Annotated

import typer

from seqtool.cli.common import (AttnOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelArg, check_model, emit, handle_errors,
                                log, progress)
from seqtool.cli.gates import FailOverOpt, check_gates, parse_gates
from seqtool.cli.dry_run import DryRunOpt
from seqtool.cli.common import DeviceMapOpt, MaxMemoryOpt, offload_option


def register(app: typer.Typer) -> None:
    @app.command("profile")
    @handle_errors
    def profile_command(
        model: ModelArg,
        seq_len: Annotated[str | None, typer.Option("--seq-len", help="Prompt length, e.g. 2048, 2k, 32k (k = 1024). Default 2k.", show_default=False)] = None,
        sweep: Annotated[str | None, typer.Option("--sweep", help="Comma-separated lengths, e.g. 1k,4k,16k.", show_default=False)] = None,
        batch: Annotated[int, typer.Option("--batch", help="Sequences per forward.")] = 1,
        decode_tokens: Annotated[int, typer.Option("--decode-tokens", help="Tokens decoded with the KV cache after the prefill.")] = 32,
        dtype: DtypeOpt = "auto",
        device: DeviceOpt = "auto",
        device_map: DeviceMapOpt = None,
        max_memory: MaxMemoryOpt = None,
        warmup: Annotated[int, typer.Option("--warmup", help="Untimed prefills (each with 2 decode steps) first.")] = 1,
        repeats: Annotated[int, typer.Option("--repeats", help="Timed prefills per length (median and p90 over them).")] = 3,
        attn: AttnOpt = None,
        breakdown: Annotated[bool, typer.Option("--breakdown", help="Add prefill time per module kind (torch.profiler).")] = False,
        compare: Annotated[str | None, typer.Option("--compare", help="A second model profiled the same way; prints both and the ratios.", show_default=False)] = None,
        threads: Annotated[int | None, typer.Option("--threads", help="CPU threads for torch (default: torch's choice).", show_default=False)] = None,
        json_out: JsonOpt = False,
        csv_path: Annotated[str | None, typer.Option("--csv", help="Also write the rows to this CSV file.", show_default=False)] = None,
        plot_path: Annotated[str | None, typer.Option("--plot", help="Also plot latency/memory against length to this PNG (needs matplotlib, the plot extra).", show_default=False)] = None,
        max_seconds: Annotated[float | None, typer.Option("--max-seconds", help="Skip lengths estimated (from FLOPs and a measured rate) to take longer than this.", show_default=False)] = None,
        fail_over: FailOverOpt = None,
        dry_run: DryRunOpt = False,
    ) -> None:
        """Measure prefill and decode latency, peak memory, KV-cache bytes and FLOPs at one or more lengths.

        On CPU every length runs in its own process (clean peak-RSS, OOM kills caught). Lengths that run out of
        memory show OOM and the sweep goes on; lengths estimated not to fit (or, with --max-seconds, to take
        longer) are skipped with the estimate. A failed measurement exits 1 with its error on stderr.

        Examples:
          seqtool profile tiny-llama --seq-len 2k --decode-tokens 16
          seqtool profile llama-3.1-8b --sweep 8k,16k,32k --breakdown --json
          seqtool profile ./ckpt --compare ./ckpt-gqa --sweep 1k,4k --csv out.csv --plot out.png
          seqtool profile llama-3.2-1b --sweep 4k,16k,32k --max-seconds 120
          seqtool profile ./base --compare ./gqa --seq-len 2k --fail-over prefill=0.8   # CI gate: exit 1
          seqtool profile llama-3.1-8b --seq-len 32k --dry-run
        """
        check_model(model)
        gates = parse_gates(fail_over, "profile")
        if dry_run:
            from seqtool.cli.dry_run import print_plan
            from seqtool.errors import BadInputError

            if compare is not None:
                raise BadInputError("--dry-run plans one model; run it once per model instead of --compare")
            return print_plan(model, "profile", dict(seq_len=seq_len, sweep=sweep, batch=batch,
                                                     decode_tokens=decode_tokens, warmup=warmup, repeats=repeats,
                                                     attn=attn), device=device, dtype=dtype, json_out=json_out)
        if compare is not None:
            check_model(compare)
        from seqtool.profile.report import check_output_path, render, require_matplotlib, write_csv, write_plot
        from seqtool.errors import SeqtoolError
        from seqtool.profile.results import ERROR
        from seqtool.profile.run import profile_model
        from seqtool.utils import format_bytes, parse_length_list

        if csv_path:
            check_output_path(csv_path, "--csv")
        if plot_path:
            check_output_path(plot_path, "--plot")
            require_matplotlib()
        n_lengths = len(parse_length_list(sweep)) if sweep else 1
        with offload_option(device_map, max_memory, model, compare), progress("profiling", total=n_lengths * (2 if compare else 1)) as advance:
            def on_row(source, row):
                advance(1)
                status = row.status if row.status != "ok" else f"prefill {row.prefill_median_s:.3g} s"
                log(f"{source} @ {row.seq_len}: {status}")

            def on_start(source, length, seconds, memory):
                log(f"{source} @ {length}: starting, estimated ~{seconds:.3g} s and ~{format_bytes(memory)}")

            report = profile_model(model, seq_len=seq_len, sweep=sweep, batch=batch, decode_tokens=decode_tokens,
                                   dtype=dtype, device=device, warmup=warmup, repeats=repeats, attn=attn,
                                   breakdown=breakdown, compare=compare, threads=threads,
                                   progress=on_row, max_seconds=max_seconds, on_start=on_start)
        if csv_path:
            write_csv(report, csv_path)
            log(f"wrote {csv_path}")
        if plot_path:
            write_plot(report, plot_path)
            log(f"wrote {plot_path}")
        emit(report, json_out, render)
        failed = [(m.source, r) for m in report.models for r in m.rows if r.status == ERROR]
        if failed:
            source, row = failed[0]
            raise SeqtoolError(f"profiling {source} at {row.seq_len} tokens failed: {row.note}")
        check_gates(gates, report, "profile")
