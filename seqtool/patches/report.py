"""``seqtool patch --report``: per layer and head, the dense attention mass a patch keeps and the work it does.

The patched model reads a probe through its own cache the way an evaluation does: the probe is prefilled except
its last ``tail`` tokens, which are fed one at a time, then ``answer`` tokens are generated greedily. A
:class:`~seqtool.patches.recall.RecallMeter` measures *attention recall* (share of the dense attention mass the
selection kept, evicted keys included) per layer and head, on every query (``mass_kept``) and on the *answer
queries* (``recall_answer``: the last probe token, whose query produces the first answer token, and the generated
ones). With a tokenizer the probe is a passkey prompt (the classic repeated-sentence filler with one "The pass
key is N" line at half depth, then the question), so a low ``recall_answer`` at a generous budget shows a
selection that misses what retrieval needs; without one it is random tokens. ``keys_computed`` is kept / causal
pairs, as measured by the selections.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from seqtool.patches.recall import RecallMeter
from seqtool.patches.runtime import apply_patch, make_cache

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


@dataclass
class HeadReport:
    layer: int
    head: int
    method: str
    mass_kept: float
    keys_computed: float
    recall_answer: float = float("nan")


@dataclass
class PatchReport:
    method: str
    spec: str
    probe_tokens: int
    min_len: int
    mass_kept: float
    keys_computed: float
    heads: list[HeadReport] = field(default_factory=list)
    probe: str = "random"
    recall_answer: float = float("nan")
    answer: str | None = None  # the passkey probe's expected answer
    generated: str | None = None  # what the patched model answered


def passkey_probe(tokenizer: Any, tokens: int, seed: int = 0) -> tuple[list[int], str]:
    """Token ids (about ``tokens`` long, bos first when the tokenizer has one) of a passkey prompt and its key."""
    key = str(int(torch.randint(10_000, 100_000, (1,), generator=torch.Generator().manual_seed(seed))))
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    head = enc("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about it. ")
    needle, question, filler = enc(NEEDLE.format(key=key)), enc(QUESTION), enc(FILLER)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    room = max(2 * len(filler), tokens - len(bos) - len(head) - len(needle) - len(question))
    hay = (filler * (room // len(filler) + 1))[:room]
    half = room // 2
    return bos + head + hay[:half] + needle + hay[half:] + question, key


def _run_probe(model, ids: torch.Tensor, tail: int, answer: int, meter: RecallMeter) -> list[int]:
    """Prefill, feed the last ``tail`` tokens one at a time, generate ``answer`` tokens greedily."""
    cache = make_cache(model)
    t = ids.shape[1]
    tail = max(1, min(tail, t - 1))
    meter.phase = "prefill"
    out = model(ids[:, : t - tail], cache=cache, use_cache=True)
    for j in range(t - tail, t):
        meter.phase = "answer" if j == t - 1 else "tail"
        out = model(ids[:, j : j + 1], cache=cache, use_cache=True)
    gen = []
    for _ in range(answer):
        nxt = out.logits[:, -1].argmax(-1)
        gen.append(int(nxt[0]))
        out = model(nxt[:, None], cache=cache, use_cache=True)
    return gen


def patch_report(model: Any, method: str, options: dict[str, Any], *, probe_tokens: int = 512, seed: int = 0,
                 tokenizer: Any = None, tail: int = 16) -> PatchReport:
    """Apply ``method`` to ``model``, read a probe (passkey with ``tokenizer``, else random tokens), measure
    recall and work, and restore the model."""
    from seqtool.arch.offload import input_device
    device = input_device(model)
    key = None
    if tokenizer is not None:
        ids_list, key = passkey_probe(tokenizer, probe_tokens, seed)
        ids, probe, n_answer = torch.tensor([ids_list], device=device), "passkey", len(key) + 2
    else:
        vocab = model.config.vocab_size
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, max(4, vocab - 1), (1, probe_tokens), generator=gen).to(device)
        probe, n_answer = "random", 4
    handle = apply_patch(model, method, **options)
    try:
        with RecallMeter(handle) as meter, torch.no_grad():
            out_ids = _run_probe(model, ids, tail, n_answer, meter)
        all_q, answer_q = meter.per_head(None), meter.per_head("answer")
        heads = []
        for i, (layer, rt) in enumerate(sorted(handle.runtimes.items())):
            per_head_total = rt.total_pairs / rt.n_heads
            for h in range(rt.n_heads):
                heads.append(HeadReport(layer, h, rt.method.name, float(all_q[i, h]),
                                        float(rt.kept_pairs[h]) / per_head_total, float(answer_q[i, h])))
        generated = tokenizer.decode(out_ids, skip_special_tokens=True) if tokenizer is not None else None
        return PatchReport(method, handle.spec, ids.shape[1], int(getattr(handle.runtimes[0].method, "min_len", 0)),
                           meter.mean(None), handle.kept_fraction() or 1.0, heads, probe, meter.mean("answer"),
                           key, generated)
    finally:
        handle.remove()
