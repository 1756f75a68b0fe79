"""Exact-match scoring of generated answers."""
from __future__ import annotations


def normalize_answer(text: str) -> str:
    """The answer the model gave: first line of ``text``, whitespace and a trailing period stripped."""
    line = text.split("\n", 1)[0].strip()
    if line.endswith("."):
        line = line[:-1].rstrip()
    return " ".join(line.split())


def exact_match(generated: str, answer: str) -> float:
    """1.0 if the normalised generation equals ``answer`` exactly, else 0.0."""
    return 1.0 if normalize_answer(generated) == " ".join(answer.split()) else 0.0


def stop_token_ids(tokenizer) -> frozenset[int]:
    """EOS plus every token whose text contains a newline: generation ends with the answer's line."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    ids.update(i for i, p in enumerate(pieces) if "\n" in p)
    return frozenset(ids)
