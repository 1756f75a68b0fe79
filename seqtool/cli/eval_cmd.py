"""`seqtool eval MODEL`: held-out perplexity and long-context retrieval accuracy (passkey, NIAH, multi-key, VT)."""
from __future__ import annotations

from contextlib import ExitStack
from typing import Annotated

import typer

from seqtool.cli import common
from seqtool.cli.common import AttnOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelArg, check_model, emit, handle_errors, table
from seqtool.cli.gates import FailUnderOpt, check_gates, parse_gates
from seqtool.cli.dry_run import DryRunOpt
from seqtool.cli.common import DeviceMapOpt, MaxMemoryOpt, offload_option
from seqtool.utils import parse_length_list


def _fmt_depth(d) -> str:
    return "-" if d is None else f"{d:g}"


def render(result) -> str:
    """Perplexity table, accuracy table (task x length x depth, plus a mean row per task/length), deltas."""
    parts = []
    if result.ppl:
        parts.append(table([(p.data, p.seq_len, p.stride, p.tokens, f"{p.nll:.4f}", f"{p.ppl:.3f}") for p in result.ppl],
                           ["ppl data", "seq_len", "stride", "tokens", "nll", "ppl"]))
    if result.scores:
        rows = []
        for task in dict.fromkeys(s.task for s in result.scores):
            for L in result.seq_lens:
                cells = [s for s in result.scores if s.task == task and s.seq_len == L]
                rows.extend((task, L, _fmt_depth(s.depth), s.samples, f"{s.accuracy:.3f}") for s in cells)
                rows.append((task, L, "mean", sum(s.samples for s in cells), f"{result.mean_accuracy(task, L):.3f}"))
        parts.append(table(rows, ["task", "seq_len", "depth", "samples", "accuracy"]))
    if getattr(result, "recall", None):
        parts.append(table([(r.task, r.seq_len, f"{r.answer:.3f}", f"{r.all:.3f}",
                             f"{min(min(row) for row in r.per_head_answer):.3f}") for r in result.recall],
                           ["recall", "seq_len", "answer queries", "all queries", "worst head (answer)"]))
    if result.baseline is not None:
        parts.append(f"compared with {result.baseline.model}:\n" + table(
            [(d.task, d.seq_len, _fmt_depth(d.depth), d.metric, f"{d.value:.4g}", f"{d.baseline:.4g}", f"{d.delta:+.4g}")
             for d in result.deltas], ["task", "seq_len", "depth", "metric", "value", "baseline", "delta"]))
    lengths = ", ".join(str(L) for L in result.seq_lens)
    parts.append(f"eval of {result.model}: {result.seconds:.1f} s in total ({', '.join(result.tasks)} at {lengths} "
                 "tokens" + (f"; ppl text: {result.ppl[0].data}, {result.ppl[0].tokens} tokens scored" if result.ppl
                             else "") + ")")
    return "\n\n".join(parts)


class _Bars:
    """One progress bar at a time on stderr (none when stderr is not a TTY)."""

    def __init__(self, stack: ExitStack):
        self.stack = stack
        self.inner: ExitStack | None = None

    def __call__(self, total: int, desc: str):
        if self.inner is not None:
            self.inner.close()
        self.inner = self.stack.enter_context(ExitStack())
        return self.inner.enter_context(common.progress(desc, total))


def _floats(text: str | None) -> list[float] | None:
    if not text:
        return None
    from seqtool.errors import BadInputError

    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BadInputError(f"malformed --depths '{text}'; use e.g. 0,0.25,0.5,0.75,1") from None


def register(app: typer.Typer) -> None:
    @app.command("eval")
    @handle_errors
    def eval_command(
        model: ModelArg,
        task: Annotated[str, typer.Option("--task", help="ppl|passkey|niah|multikey|vt|all (comma list allowed).")] = "all",
        seq_len: Annotated[str, typer.Option("--seq-len", help="Prompt length(s), e.g. 2k or 1k,2k,4k.")] = "2k",
        samples: Annotated[int, typer.Option("--samples", help="Prompts per task, length and depth.")] = 20,
        depths: Annotated[str | None, typer.Option("--depths", help="Needle depths in [0, 1], e.g. 0,0.5,1 (default 0,0.25,0.5,0.75,1).")] = None,
        attn: AttnOpt = None,
        seed: Annotated[int, typer.Option("--seed", help="Task generation seed (same seed, same prompts).")] = 0,
        batch: Annotated[int, typer.Option("--batch", help="Prompts per forward pass (left padded).")] = 1,
        data: Annotated[str | None, typer.Option("--data", help="Text file for ppl (default: held-out stdlib split).")] = None,
        stride: Annotated[int | None, typer.Option("--stride", help="ppl window stride (default seq_len/2).")] = None,
        ppl_tokens: Annotated[int, typer.Option("--ppl-tokens", help="Tokens scored for ppl (0: all).")] = 16384,
        compare: Annotated[str | None, typer.Option("--compare", help="Another model to evaluate the same way; prints deltas.")] = None,
        recall: Annotated[bool, typer.Option("--recall", help="With --attn (or a patched checkpoint): attention recall of the patch on the retrieval prompts (answer / all queries).")] = False,
        dtype: DtypeOpt = "auto",
        device: DeviceOpt = "auto",
        fail_under: FailUnderOpt = None,
        device_map: DeviceMapOpt = None,
        max_memory: MaxMemoryOpt = None,
        json_out: JsonOpt = False,
        dry_run: DryRunOpt = False,
    ) -> None:
        """Measure held-out perplexity and retrieval accuracy at one or more context lengths.

        Examples:
          seqtool eval ref --task all --seq-len 2k
          seqtool eval ./gqa-ref --task passkey --seq-len 1k,2k --compare ref --json
          seqtool eval ref --task passkey --attn infllm:budget=0.5,min_len=0 --recall
          seqtool eval ./ckpt --task ppl,passkey --seq-len 1k --fail-under passkey=0.9,ppl=40   # CI gate: exit 1
        """
        check_model(model)
        gates = parse_gates(fail_under, "eval", tasks=task)
        if dry_run:
            from seqtool.cli.dry_run import print_plan

            return print_plan(model, "eval", dict(task=task, seq_lens=parse_length_list(seq_len), attn=attn,
                                                  data=data, stride=stride, ppl_tokens=ppl_tokens or None,
                                                  compare=compare), device=device, dtype=dtype, json_out=json_out)
        if compare is not None:
            check_model(compare)  # checked now, not after the main evaluation
        seq_lens, depth_list = parse_length_list(seq_len), _floats(depths)
        from seqtool.eval import evaluate

        with offload_option(device_map, max_memory, model, compare), ExitStack() as stack:
            result = evaluate(model, task, seq_lens=seq_lens, samples=samples,
                              depths=depth_list, seed=seed, batch=batch, attn=attn, data=data, stride=stride,
                              ppl_tokens=ppl_tokens or None, dtype=dtype, device=device, compare=compare,
                              progress=_Bars(stack), recall=recall)
        emit(result, json_out, render)
        check_gates(gates, result, "eval")
