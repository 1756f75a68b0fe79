"""Calibration and recovery text: a user file, or built-in text when none is given.

Built-in text is the training split of :mod:`seqtool.zoo.corpus` (the Python standard library's sources, present
wherever seqtool installs); evaluation uses the held-out split, so calibrating never sees evaluation text.
A short fixed paragraph is the fallback when that corpus is unavailable.
"""
from __future__ import annotations

from pathlib import Path

import torch

from seqtool.errors import BadInputError

_FALLBACK = (
    "The quick brown fox jumps over the lazy dog. A model reads text one token at a time and predicts what comes "
    "next. Attention lets every position look back at earlier positions; the key and value projections decide what "
    "each position offers, and the query decides what it looks for. Pruning removes the heads and channels that "
    "contribute least, and a short fine-tune lets the rest of the network adjust.\n"
)


def builtin_text(max_chars: int) -> str:
    """At least ``max_chars`` characters of built-in text (the corpus train split, else a repeated paragraph)."""
    try:
        from seqtool.zoo.corpus import load_text

        text = load_text("train", max_chars=max_chars)
    except Exception:  # the corpus module is optional for conversion
        text = ""
    if len(text) < max_chars:
        text = (text + "\n\n" + _FALLBACK * (max_chars // len(_FALLBACK) + 1))[:max_chars]
    return text


def calibration_ids(tokenizer, *, path: str | Path | None = None, samples: int = 50, seq_len: int = 128,
                    seed: int = 0) -> torch.Tensor:
    """(samples, seq_len) token ids: windows at seeded random offsets of the file's (or built-in) text."""
    if samples < 1 or seq_len < 2:
        raise BadInputError(f"need samples >= 1 and seq_len >= 2, got samples={samples}, seq_len={seq_len}")
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise BadInputError(f"calibration file '{path}' does not exist; pass a UTF-8 text file to --calib")
        text = file.read_text(encoding="utf-8", errors="replace")
    else:
        # ~1 token per 2 characters is a safe lower bound for byte and BPE tokenizers; 4x leaves room to sample.
        text = builtin_text(samples * seq_len * 8)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    if ids.numel() < seq_len:
        raise BadInputError(
            f"calibration text has {ids.numel()} tokens but --seq-len is {seq_len}; give a longer --calib file"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (samples,), generator=gen)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def run_batches(model, ids: torch.Tensor, batch_size: int = 8) -> None:
    """Forward ``ids`` (N, T) through ``model`` in batches (hooks collect what they need); logits are discarded."""
    from seqtool.arch.offload import input_device
    device = input_device(model)
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start:start + batch_size].to(device)
        # logits_to_keep=1: the LM head over the whole sequence is wasted work for calibration.
        model(input_ids=batch, use_cache=False, logits_to_keep=1)
