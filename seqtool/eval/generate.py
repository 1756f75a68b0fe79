"""Greedy answer generation with the KV cache, batched with left padding.

The prompt is prefilled except its last ``tail`` tokens, which are fed one at a time through the cache, so
decode-time attention methods see real work before the answer is generated.
"""
from __future__ import annotations

from typing import Sequence

import inspect

import torch


def _pad_left(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, t - len(r):] = 1
    return ids, mask


@torch.no_grad()
def _make_cache(model) -> DynamicCache:
    """The cache a patched model needs (its methods' cache layers), else a plain DynamicCache."""
    from seqtool.patches import make_cache

    return make_cache(model)


def greedy_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *,
                    pad_id: int, stop_ids: set[int] | frozenset[int] = frozenset(), tail: int = 16,
                    on_phase=None) -> list[list[int]]:
    """Generate greedily for a batch of prompts (lists of token ids); returns the new tokens per prompt.

    Left padding: ``attention_mask`` (B, T) marks real tokens; ``position_ids`` restart at 0 on each row's
    first real token, so a padded row computes what it would alone. A row stops after emitting a token in
    ``stop_ids`` (kept in its output) or after its ``max_new_tokens``. ``on_phase(name)`` (diagnostics) is
    called before the ``"prefill"``, the ``"tail"`` steps and the ``"answer"`` steps (the last prompt token,
    whose query produces the first answer token, and every generated token).
    """
    mark = on_phase or (lambda name: None)
    from transformers import DynamicCache

    # transformers renamed `past_key_values` to `cache` (>= 5.2x); older 5.x only knows the old name.
    ckw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    from seqtool.arch.offload import input_device
    dev = input_device(model)
    n = len(prompts)
    limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    ids, mask = _pad_left(prompts, pad_id)
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    t = ids.shape[1]
    tail = max(1, min(tail, min(len(p) for p in prompts) - 1, t - 1)) if t > 1 else 0
    cache = _make_cache(model)
    split = t - tail
    mark("prefill")
    out = model(input_ids=ids[:, :split], attention_mask=mask[:, :split], position_ids=pos[:, :split],
                **{ckw: cache}, use_cache=True)
    logits = out.logits[:, -1]
    for j in range(split, t):
        mark("answer" if j == t - 1 else "tail")
        out = model(input_ids=ids[:, j:j + 1], attention_mask=mask[:, :j + 1], position_ids=pos[:, j:j + 1],
                    **{ckw: cache}, use_cache=True)
        logits = out.logits[:, -1]
    gen: list[list[int]] = [[] for _ in range(n)]
    done = [lim <= 0 for lim in limits]
    cur_pos = pos[:, -1:]
    for _ in range(max(limits) if limits else 0):
        nxt = logits.float().argmax(-1)
        for i in range(n):
            if not done[i]:
                tok = int(nxt[i])
                gen[i].append(tok)
                if tok in stop_ids or len(gen[i]) >= limits[i]:
                    done[i] = True
        if all(done):
            break
        mask = torch.cat([mask, mask.new_ones((n, 1))], dim=1)
        cur_pos = cur_pos + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=cur_pos,
                    **{ckw: cache}, use_cache=True)
        logits = out.logits[:, -1]
    return gen
