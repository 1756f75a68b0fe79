"""`seqtool finetune MODEL --data D --steps N -o OUT`: train with the engine in seqtool.train, save merged."""
from __future__ import annotations

from typing import Annotated

import typer

from seqtool.cli.common import (DeviceOpt, ForceOpt, JsonOpt, ModelArg, OutputOpt, check_model, check_output, emit,
                                handle_errors, is_quiet, log, table)
from seqtool.cli.dry_run import DryRunOpt


def render(result) -> str:
    rows = [
        ("method / kinds", f"{result.method} / {','.join(result.train)}"),
        ("objectives", ", ".join(f"{o['name']}={o['weight']:g}" for o in result.objectives)),
        ("trainable params", f"{result.trainable_params:,} of {result.total_params:,}"),
        ("data", f"{result.data['source']} ({result.data['train_rows']} rows x {result.data['seq_len']}, "
                 f"fingerprint {result.data['fingerprint']})"),
        ("steps / tokens", f"{result.steps} / {result.tokens:,}"),
        ("loss first -> final", f"{result.loss_first.get('loss', float('nan')):.4f} -> "
                                f"{result.loss_final.get('loss', float('nan')):.4f}"),
        ("held-out ppl before -> after", f"{result.heldout_ppl_before:.3f} -> {result.heldout_ppl:.3f}"),
        ("tokens/s (median)", f"{result.tokens_per_s:,.0f}"),
    ]
    if getattr(result, "long_context", None):
        lc = result.long_context
        rows.append(("long context", f"{lc['context']} tokens, RoPE {lc['rope_scale'] or 'unchanged'} "
                                     f"({lc['rope_factor_source']}), training attention {lc['attention']}"
                                     + (f" (groups {lc['group_size']}" + (f", {lc['sinks']} sinks)" if lc['sinks'] else ")")
                                        if lc['group_size'] else "")))
    lines = [table(rows, ["", ""]), ""]
    if result.adapter_dir:
        lines.append(f"adapter: {result.adapter_dir}")
    lines.append(f"saved: {result.output}" if result.output else "not saved (no output given)")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    @handle_errors
    def finetune_command(
        model: ModelArg,
        steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps (required unless --context: then the long-context recipe's).", show_default=False)] = None,
        output: OutputOpt = None,
        data: Annotated[str | None, typer.Option("--data", help="Text file, directory of text files, JSONL with 'text', a save_to_disk directory or a dataset in the local HF cache (default: built-in corpus).", show_default=False)] = None,
        method: Annotated[str, typer.Option("--method", help="lora | full | sinklora | s2attn (LoRA with SinkLoRA / LongLoRA grouped attention while training; needs --context).")] = "lora",
        train: Annotated[str | None, typer.Option("--train", help="Module kinds to train: attention,mlp,embed,norm; router,experts on MoE/BAM checkpoints (default attention,mlp; sinklora/s2attn: attention,embed,norm).", show_default=False)] = None,
        loss: Annotated[str | None, typer.Option("--loss", help="Weighted objectives: lm, kl (to --teacher), match (module outputs vs --teacher), answer / answer_kl (CE / KL on the answer tokens of --mix-retrieval rows), balance / zloss (MoE/BAM router losses), e.g. lm=1,kl=1,answer=1 (default lm; --context: the recipe's, where kl/match without --teacher distil from the model before the extension on its trained context).", show_default=False)] = None,
        teacher: Annotated[str | None, typer.Option("--teacher", help="Frozen teacher (same tokenizer) for kl / match.", show_default=False)] = None,
        kl_temperature: Annotated[float, typer.Option("--kl-temperature", help="KL temperature.")] = 1.0,
        kl_top_k: Annotated[int | None, typer.Option("--kl-top-k", help="KL over the teacher's top-k tokens only.", show_default=False)] = None,
        match: Annotated[str, typer.Option("--match", help="Module kinds whose outputs 'match' compares.")] = "attention",
        seq_len: Annotated[int | None, typer.Option("--seq-len", help="Tokens per packed row (default 256; --context sets it).", show_default=False)] = None,
        batch: Annotated[int | None, typer.Option("--batch", help="Rows per micro-batch, all processes together (default 8; --context: the recipe's).", show_default=False)] = None,
        grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = 1,
        lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate (default: lora 1e-3, full 1e-4).", show_default=False)] = None,
        warmup: Annotated[int | None, typer.Option("--warmup", help="Warmup steps (default: min(100, steps/10)).", show_default=False)] = None,
        weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")] = 0.0,
        clip: Annotated[float, typer.Option("--clip", help="Gradient-norm clipping (0: off).")] = 1.0,
        short_frac: Annotated[float | None, typer.Option("--short-frac", help="--context: share of the steps on 4 rows of 512 tokens (at most the trained context) before the rows of --context (default 0).", show_default=False)] = None,
        mix_retrieval: Annotated[float | None, typer.Option("--mix-retrieval", help="Share of synthetic retrieval rows (passkey, NIAH, ...), e.g. 0.3 (default 0; --context: the recipe's).", show_default=False)] = None,
        context: Annotated[str | None, typer.Option("--context", help="Extend the context: train rows of this length (8k) and set max_position_embeddings.", show_default=False)] = None,
        rope_scale: Annotated[str | None, typer.Option("--rope-scale", help="With --context: linear:F | dynamic:F | yarn:F written as rope_parameters (default: yarn, new context / trained context).", show_default=False)] = None,
        group_size: Annotated[str | None, typer.Option("--group-size", help="sinklora/s2attn group in tokens; must divide --context (default context/4).", show_default=False)] = None,
        sinks: Annotated[int | None, typer.Option("--sinks", help="sinklora global sink tokens (default 4).", show_default=False)] = None,
        eval_every: Annotated[int, typer.Option("--eval-every", help="Held-out loss every N steps (0: only before/after).")] = 0,
        run_dir: Annotated[str | None, typer.Option("--run-dir", help="Checkpoints, log.jsonl and the tokenised data cache.", show_default=False)] = None,
        resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --run-dir (same arguments).")] = False,
        save_every: Annotated[str | None, typer.Option("--save-every", help="Checkpoint every N steps (200) or minutes (10m).", show_default=False)] = None,
        save_adapter: Annotated[str | None, typer.Option("--save-adapter", help="Also write the peft LoRA adapter here.", show_default=False)] = None,
        lora_rank: Annotated[int, typer.Option("--lora-rank", help="LoRA rank.")] = 8,
        lora_alpha: Annotated[int, typer.Option("--lora-alpha", help="LoRA alpha.")] = 16,
        grad_checkpoint: Annotated[bool, typer.Option("--grad-checkpoint", help="Recompute activations in the backward pass.")] = False,
        bf16: Annotated[str, typer.Option("--bf16", help="auto (autocast on GPU) | on | off.")] = "auto",
        dist: Annotated[str, typer.Option("--dist", help="Under torchrun / accelerate launch: fsdp | ddp.")] = "fsdp",
        plot: Annotated[bool, typer.Option("--plot", help="Write run-dir/loss.png.")] = False,
        seed: Annotated[int, typer.Option("--seed", help="Data order, held-out split and init seed.")] = 0,
        threads: Annotated[int | None, typer.Option("--threads", help="CPU threads for torch.", show_default=False)] = None,
        force: ForceOpt = False,
        device: DeviceOpt = "auto",
        json_out: JsonOpt = False,
        dry_run: DryRunOpt = False,
    ) -> None:
        """Fine-tune a model (LoRA or full, on chosen module kinds) and save it merged; plain transformers loads it.

        Examples:
          seqtool finetune tiny-qwen2 --data notes.txt --steps 200 -o tuned
          seqtool finetune ./llama --data corpus.jsonl --method full --train attention --steps 1000 --run-dir run -o out
          seqtool finetune ./student --teacher ./llama --loss lm=0.5,kl=1 --mix-retrieval 0.3 --steps 500 -o out
          seqtool finetune ./llama --run-dir run --resume --steps 1000 -o out   # continue a killed run
          torchrun --nproc_per_node 4 -m seqtool finetune ./llama --data d.jsonl --dist fsdp --steps 1000 -o out
          seqtool finetune ref --method sinklora --context 8k --rope-scale yarn:4 --run-dir run -o ref-8k
          seqtool finetune ./llama --method s2attn --context 16k --group-size 4k --steps 500 -o out
        """
        check_model(model)  # model, teacher, then output: checked before anything is loaded
        if teacher is not None:
            check_model(teacher)
        if dry_run:
            from seqtool.cli.dry_run import print_plan

            return print_plan(model, "finetune", dict(
                steps=steps, data=data, method=method, train=train, loss=loss, teacher=teacher, seq_len=seq_len,
                batch=batch, grad_accum=grad_accum, lora_rank=lora_rank, lora_alpha=lora_alpha,
                grad_checkpoint=grad_checkpoint, bf16=bf16, context=context, rope_scale=rope_scale,
                group_size=group_size, sinks=sinks), device=device, dtype="auto", json_out=json_out)
        if output is not None:
            output = check_output(model, output, in_place=False, force=force)
        import os

        import torch

        from seqtool.train import dist as dist_mod
        from seqtool.train.finetune import finetune

        if threads:
            torch.set_num_threads(threads)
        main = not dist_mod.launched() or os.environ.get("RANK", "0") == "0"
        if main:
            log(f"fine-tuning {model} ({method}, {train or 'default kinds'}) for {steps or 'the default'} steps ...")
        result = finetune(model, steps=steps, data=data, output=output, method=method, train=train, loss=loss,
                          teacher=teacher, kl_temperature=kl_temperature, kl_top_k=kl_top_k, match=match,
                          seq_len=seq_len, batch=batch, grad_accum=grad_accum, lr=lr, warmup=warmup,
                          weight_decay=weight_decay, clip=clip, seed=seed, mix_retrieval=mix_retrieval, short_frac=short_frac,
                          eval_every=eval_every, run_dir=run_dir, resume=resume, save_every=save_every,
                          save_adapter=save_adapter, lora_rank=lora_rank, lora_alpha=lora_alpha,
                          grad_checkpoint=grad_checkpoint, bf16=bf16, dist=dist, plot=plot,
                          progress="off" if is_quiet() else "auto", device=device, force=force, context=context,
                          rope_scale=rope_scale, group_size=group_size, sinks=sinks)
        dist_mod.shutdown()
        if main:
            emit(result, json_out, render)
