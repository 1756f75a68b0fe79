"""Sliding-window perplexity over a token stream."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from seqtool.errors import BadInputError
from seqtool.eval.results import PplResult


@torch.no_grad()
def sliding_window_ppl(model, token_ids: np.ndarray, seq_len: int, *, stride: int | None = None,
                       bos_id: int | None = None, max_tokens: int | None = None, data: str = "",
                       progress: Callable[[int], None] | None = None) -> PplResult:
    """Perplexity of ``token_ids`` (N,) with windows of ``seq_len`` tokens moved by ``stride``.

    Each window scores only the tokens the previous window did not (so every token is scored once, with up to
    ``seq_len - stride`` tokens of context). A BOS token, when given, starts every window.
    """
    stride = stride or max(1, seq_len // 2)
    if stride > seq_len:
        raise BadInputError(f"stride {stride} is larger than the window {seq_len}; use a smaller --stride")
    ids = np.asarray(token_ids, dtype=np.int64)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    lead = 1 if bos_id is not None else 0
    win = seq_len - lead
    if len(ids) < 2:
        raise BadInputError("the perplexity text has fewer than 2 tokens; pass a longer --data file")
    from seqtool.arch.offload import input_device
    dev = input_device(model)
    total_nll, total_n, prev_end, begin = 0.0, 0, 0, 0
    while prev_end < len(ids):
        end = min(begin + win, len(ids))
        chunk = torch.from_numpy(ids[begin:end])
        if lead:
            chunk = torch.cat([torch.tensor([bos_id]), chunk])
        x = chunk[None].to(dev)
        logits = model(input_ids=x).logits[0, :-1].float()
        nll = F.cross_entropy(logits, x[0, 1:], reduction="none")
        # Targets x[1:] are ids[begin + 1 - lead:end]; score those at index >= prev_end (ids[0] only after a BOS).
        first = max(prev_end, 1 - lead)
        n_new = end - first
        if n_new > 0:
            total_nll += float(nll[-n_new:].sum())
            total_n += n_new
        prev_end = end
        begin = end - (win - stride) if end < len(ids) else end
        if progress:
            progress(1)
    mean = total_nll / total_n
    return PplResult(data=data, seq_len=seq_len, stride=stride, tokens=total_n, nll=round(mean, 5),
                     ppl=round(math.exp(mean), 4))


def count_windows(n_tokens: int, seq_len: int, stride: int, lead: int) -> int:
    """How many forward passes ``sliding_window_ppl`` makes (for progress bars)."""
    win = seq_len - lead
    n, begin, prev_end = 0, 0, 0
    while prev_end < n_tokens:
        end = min(begin + win, n_tokens)
        n += 1
        prev_end = end
        begin = end - (win - stride) if end < n_tokens else end
    return n
