"""A byte-level tokenizer built offline (no training, no files): every byte is one token.

Used by the tiny and real-shape presets so that generation and tokenization work without downloads.
Ids: 0 ``<pad>``, 1 ``<s>``, 2 ``</s>``, 3 ``<unk>``, then 256 byte tokens.
"""
from __future__ import annotations

from functools import lru_cache

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
BYTE_VOCAB_SIZE = 320  # 4 specials + 256 bytes, rounded up so embeddings stay aligned


@lru_cache(maxsize=1)
def _byte_level_backend():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors  # lazy: CLI start-up stays fast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    return backend


def byte_level_tokenizer():
    """A fresh ``PreTrainedTokenizerFast`` over bytes (adds ``<s>`` at the start of each sequence)."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_backend(), bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=1 << 20,
    )
    tokenizer.padding_side = "left"
    return tokenizer
