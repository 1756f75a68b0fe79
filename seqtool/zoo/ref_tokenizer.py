"""Byte-level BPE tokenizer for the reference model, trained offline with ``tokenizers``."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, out_dir: str | Path | None = None):
    """Train a byte-level BPE on ``texts``; return a ``PreTrainedTokenizerFast`` (saved to ``out_dir`` if given).

    The saved directory loads with ``AutoTokenizer.from_pretrained``. BOS is prepended by the caller,
    not by the tokenizer, so prompt pieces can be encoded separately and concatenated.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   padding_side="left", model_max_length=8192)
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def chunk_text(text: str, size: int = 4096) -> list[str]:
    """Cut ``text`` into pieces for tokenizer training (keeps memory bounded)."""
    return [text[i:i + size] for i in range(0, len(text), size)]
