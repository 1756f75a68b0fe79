"""``seqtool.evaluate``: perplexity and synthetic long-context retrieval accuracy of one model."""
from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from seqtool.errors import BadInputError
from seqtool.eval.generate import greedy_generate
from seqtool.eval.perplexity import count_windows, sliding_window_ppl
from seqtool.eval.results import DeltaRow, EvalResult, RecallRow, SampleResult, TaskScore
from seqtool.eval.scoring import exact_match, normalize_answer, stop_token_ids
from seqtool.eval.tasks import TASKS, make_samples

ALL_TASKS = ("ppl",) + TASKS
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
FILLER_CHARS = 400_000  # held-out characters tokenized for haystacks
PPL_TOKENS = 16_384  # default number of held-out tokens scored for perplexity
# Progress callback: (total_units, description) -> advance(n) function.
ProgressFactory = Callable[[int, str], Callable[[int], None]]


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """``"all"`` / ``"ppl,passkey"`` / a list → validated task names in canonical order."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if "all" in names:
        return list(ALL_TASKS)
    bad = [t for t in names if t not in ALL_TASKS]
    if bad or not names:
        raise BadInputError(f"unknown task {', '.join(bad) or '(none)'}; choose from {', '.join(ALL_TASKS)} or all")
    return [t for t in ALL_TASKS if t in names]


_STREAMS: dict[tuple, np.ndarray] = {}


def heldout_tokens(tokenizer, max_chars: int = FILLER_CHARS, data: str | Path | None = None) -> np.ndarray:
    """Token ids (N,) of the held-out stdlib split (or of the text file ``data``), cached per tokenizer."""
    key = (id(tokenizer), max_chars, str(data))
    if key not in _STREAMS:
        if data is not None:
            path = Path(data)
            if not path.is_file():
                raise BadInputError(f"--data file '{data}' does not exist; pass a UTF-8 text file")
            text = path.read_text(encoding="utf-8", errors="replace")
        else:
            from seqtool.zoo.corpus import load_text

            text = load_text("heldout", max_chars)
        step = 65_536
        ids: list[int] = []
        for i in range(0, len(text), step):
            ids.extend(tokenizer.encode(text[i:i + step], add_special_tokens=False))
        _STREAMS[key] = np.asarray(ids, dtype=np.int64)
    return _STREAMS[key]


def _load(model, tokenizer, *, dtype: str, device: str, attn: str | None):
    """(model, tokenizer, name) from a source string, a LoadedModel, or a model + tokenizer."""
    if isinstance(model, (str, Path)):
        from seqtool.arch.io import load_model

        loaded = load_model(str(model), dtype=dtype, device=device, attn=attn)
        return loaded.model, loaded.tokenizer, str(model)
    if hasattr(model, "model") and hasattr(model, "tokenizer"):
        m, tok, name = model.model, model.tokenizer, getattr(model, "source", "model")
    else:
        if tokenizer is None:
            raise BadInputError("evaluate(model_object) needs tokenizer=...; or pass a checkpoint path or preset")
        m, tok, name = model, tokenizer, getattr(model.config, "_name_or_path", "") or "model"
    if attn:
        apply_attn(m, attn)
    return m, tok, name


def apply_attn(model, spec: str) -> None:
    """``sdpa``/``eager`` set the HF implementation; anything else is a seqtool patch spec."""
    if spec in ("sdpa", "eager"):
        model.set_attn_implementation(spec)
        return
    try:
        from seqtool.patches import apply_attn_spec
    except ImportError:
        model.set_attn_implementation(spec)
        return
    apply_attn_spec(model, spec)


def _noop_progress(total: int, desc: str) -> Callable[[int], None]:
    return lambda n=1: None


def evaluate(model, tasks: str | Sequence[str] = "all", *, tokenizer=None, seq_lens: Sequence[int] = (2048,),
             samples: int = 20, depths: Sequence[float] | None = None, seed: int = 0, batch: int = 1,
             attn: str | None = None, data: str | Path | None = None, stride: int | None = None,
             ppl_tokens: int | None = PPL_TOKENS, tail: int = 16, dtype: str = "auto", device: str = "auto",
             compare=None, progress: ProgressFactory | None = None, recall: bool | str = False) -> EvalResult:
    """Evaluate ``model`` (path, preset, LoadedModel, or HF model + ``tokenizer``) on ``tasks``.

    Retrieval tasks: ``samples`` prompts per (length, depth); the answer is generated greedily with the KV cache
    after the last ``tail`` prompt tokens were fed one at a time; exact match. ``ppl``: sliding-window
    perplexity over ``ppl_tokens`` held-out tokens (or ``data``). ``compare``: another model evaluated the same
    way; its result becomes ``baseline`` and ``deltas`` hold value - baseline. ``recall``: for a patched model,
    also measure attention recall on the retrieval prompts (``result.recall``; costs a dense score matrix per
    call, see :mod:`seqtool.patches.recall`); ``recall="answer"`` measures only the answer queries (cheap: no
    dense prefill scores; ``all`` is then NaN).
    """
    task_list = parse_tasks(tasks)
    depths = list(DEFAULT_DEPTHS if depths is None else depths)
    if samples < 1 or batch < 1:
        raise BadInputError("--samples and --batch must be at least 1")
    if any(not 0 <= d <= 1 for d in depths) or not depths:
        raise BadInputError("--depths must be numbers in [0, 1], e.g. 0,0.5,1")
    if isinstance(compare, (str, Path)):
        from seqtool.arch.paths import check_source

        check_source(str(compare))  # a bad --compare is reported before the main evaluation, not after it
    progress = progress or _noop_progress
    t0 = time.time()
    m, tok, name = _load(model, tokenizer, dtype=dtype, device=device, attn=attn)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    result = EvalResult(model=name, tasks=task_list, seq_lens=list(seq_lens), depths=depths, samples=samples,
                        seed=seed, attn=attn)
    limit = getattr(m.config, "max_position_embeddings", None)
    for L in seq_lens:
        if limit and L > limit:
            raise BadInputError(f"--seq-len {L} exceeds the model's max_position_embeddings {limit}")
    was_training = m.training
    m.eval()
    bos = tok.bos_token_id
    stops = stop_token_ids(tok)
    with torch.no_grad():
        if "ppl" in task_list:
            stream = heldout_tokens(tok, data=data)
            src = str(data) if data else "stdlib-heldout"
            for L in seq_lens:
                n = len(stream) if ppl_tokens is None else min(len(stream), ppl_tokens)
                st = stride or max(1, L // 2)
                adv = progress(count_windows(n, L, st, 1 if bos is not None else 0), f"ppl {L}")
                result.ppl.append(sliding_window_ppl(m, stream, L, stride=st, bos_id=bos, max_tokens=n,
                                                     data=src, progress=adv))
        filler = heldout_tokens(tok) if any(t in TASKS for t in task_list) else None
        for task in (t for t in task_list if t in TASKS):
            for L in seq_lens:
                items = make_samples(task, tok, filler, L, depths, samples, seed, split="eval")
                adv = progress(len(items), f"{task} {L}")
                preds: list[str] = []
                with _recall_meter(m, recall) as meter:
                    for i in range(0, len(items), batch):
                        chunk = items[i:i + batch]
                        gens = greedy_generate(m, [s.input_ids for s in chunk],
                                               [len(s.answer_ids) + 4 for s in chunk], pad_id=tok.pad_token_id,
                                               stop_ids=stops, tail=tail, on_phase=meter and meter.set_phase)
                        preds.extend(tok.decode(g, skip_special_tokens=True) for g in gens)
                        adv(len(chunk))
                if meter is not None:
                    heads = meter.per_head("answer")
                    result.recall.append(RecallRow(task, L, round(meter.mean("answer"), 4),
                                                   round(meter.mean(None), 4),
                                                   [[round(float(x), 4) for x in row] for row in heads]))
                for j, (s, p) in enumerate(zip(items, preds)):
                    result.details.append(SampleResult(task, L, s.meta["requested_depth"], j % samples, s.answer,
                                                       normalize_answer(p), bool(exact_match(p, s.answer))))
                for d in depths:
                    hits = [r.correct for r in result.details if r.task == task and r.seq_len == L and r.depth == d]
                    result.scores.append(TaskScore(task, L, d, len(hits), round(float(np.mean(hits)), 4)))
    if was_training:
        m.train()
    result.seconds = round(time.time() - t0, 2)
    if compare is not None:
        base = evaluate(compare, task_list, seq_lens=seq_lens, samples=samples, depths=depths, seed=seed,
                        batch=batch, attn=None, data=data, stride=stride, ppl_tokens=ppl_tokens, tail=tail,
                        dtype=dtype, device=device, progress=progress)
        result.baseline = base
        result.deltas = compute_deltas(result, base)
    return result


class _NoMeter:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def _recall_meter(model, wanted: bool | str):
    """A RecallMeter on ``model``'s patch (context manager yielding it), or one yielding None."""
    if not wanted:
        return _NoMeter()
    from seqtool.patches import get_handle
    from seqtool.patches.recall import RecallMeter

    handle = get_handle(model)
    if handle is None:
        raise BadInputError("recall needs a patched model: pass attn='METHOD:...' (--attn) or a patched checkpoint")
    return RecallMeter(handle, phases=("answer",) if wanted == "answer" else None)


def compute_deltas(result: EvalResult, base: EvalResult) -> list[DeltaRow]:
    """Rows ``value - baseline`` for every task cell and perplexity both results share."""
    rows = []
    bmap = {(s.task, s.seq_len, s.depth): s.accuracy for s in base.scores}
    for s in result.scores:
        b = bmap.get((s.task, s.seq_len, s.depth))
        if b is not None:
            rows.append(DeltaRow(s.task, s.seq_len, s.depth, "accuracy", s.accuracy, b, round(s.accuracy - b, 4)))
    pmap = {p.seq_len: p.ppl for p in base.ppl}
    for p in result.ppl:
        if p.seq_len in pmap:
            rows.append(DeltaRow("ppl", p.seq_len, None, "ppl", p.ppl, pmap[p.seq_len], round(p.ppl - pmap[p.seq_len], 4)))
    return rows
