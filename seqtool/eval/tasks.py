"""Synthetic long-context retrieval prompts (passkey, RULER-style NIAH / multi-key, variable tracking).

Prompts are built in token space: ``[bos] prefix haystack question``, exactly ``seq_len`` tokens, where the
haystack is a contiguous window of filler tokens with needle sentences inserted at line starts. The same
templates train the reference model (``split="train"``) and evaluate it (``split="eval"``): the two splits
draw keys and values from disjoint spaces (a hash bucket of the key string), and callers pass filler from
disjoint corpus splits.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from seqtool.errors import BadInputError

TASKS = ("passkey", "niah", "multikey", "vt")

PASSKEY_PREFIX = ("There is an important pass key hidden inside a lot of irrelevant text. "
                  "Find it and memorize it. I will quiz you about it.\n\n")
PASSKEY_NEEDLE = "The pass key is {key}. Remember it.\n"
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"

NIAH_PREFIX = ("Some special magic numbers are hidden inside the following text. "
               "Make sure to memorize them. I will quiz you about the numbers afterwards.\n\n")
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}.\n"
NIAH_QUESTION = ("\n\nWhat is the special magic number for {key} mentioned in the provided text? "
                 "The special magic number for {key} mentioned in the provided text is")

VT_PREFIX = "Memorize and track the chain of variable assignments hidden in the following text.\n\n"
VT_FIRST = "VAR {name} = {value}\n"
VT_NEXT = "VAR {name} = VAR {prev}\n"
VT_QUESTION = ("\n\nQuestion: Find all variables that are assigned the value {value} in the text above. "
               "Answer: According to the chain of variable assignments in the text above, {n} variables "
               "are assigned the value {value}, they are:")

NIAH_DISTRACTORS = 1
MULTIKEY_DISTRACTORS = 7
VT_HOPS = 2
_EVAL_BUCKET = 4  # one key in four belongs to the eval split
_CONS = "bcdfghjklmnprstvz"
_VOWELS = "aeiou"
_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class TaskSample:
    """One prompt. ``input_ids`` has exactly ``seq_len`` tokens (bos first); ``answer`` is the exact
    expected text; ``answer_ids`` encodes ``" " + answer`` (what follows the prompt); ``needle_pos`` is the
    token index where the queried needle starts; ``depth`` is its realised relative position in the haystack.
    ``meta["needles"]`` lists the (key, value) pairs of passkey / NIAH needles, the queried one first."""

    task: str
    seq_len: int
    depth: float
    input_ids: list[int]
    answer: str
    answer_ids: list[int]
    needle_pos: int
    meta: dict = field(default_factory=dict)


def key_split(s: str) -> str:
    """``"eval"`` or ``"train"``: the split a key/value string belongs to (disjoint by construction)."""
    h = int(hashlib.sha1(("seqtool-key:" + s).encode()).hexdigest()[:8], 16)
    return "eval" if h % _EVAL_BUCKET == 0 else "train"


def _draw(rng: np.random.Generator, make: Callable[[np.random.Generator], str], split: str,
          avoid: set[str]) -> str:
    while True:
        s = make(rng)
        if key_split(s) == split and s not in avoid:
            avoid.add(s)
            return s


def _digits(n: int) -> Callable[[np.random.Generator], str]:
    return lambda rng: str(int(rng.integers(10 ** (n - 1), 10 ** n)))


def _word(rng: np.random.Generator) -> str:
    return "".join(_CONS[int(rng.integers(len(_CONS)))] + _VOWELS[int(rng.integers(len(_VOWELS)))]
                   for _ in range(3))


def _varname(rng: np.random.Generator) -> str:
    return "".join(_UPPER[int(i)] for i in rng.integers(0, 26, size=5))


class _Encoder:
    """Encodes pieces without special tokens and knows which tokens end a line (for needle placement)."""

    _cache: dict[int, "_Encoder"] = {}

    def __init__(self, tokenizer):
        self.tok = tokenizer
        n = len(tokenizer)
        pieces = tokenizer.batch_decode([[i] for i in range(n)])
        self.ends_line = np.array([p.endswith("\n") for p in pieces], dtype=bool)

    @classmethod
    def get(cls, tokenizer) -> "_Encoder":
        enc = cls._cache.get(id(tokenizer))
        if enc is None or enc.tok is not tokenizer:
            enc = cls._cache[id(tokenizer)] = cls(tokenizer)
        return enc

    def __call__(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))


def _snap(pos: int, window: np.ndarray, ends_line: np.ndarray, lo: int, hi: int, reach: int = 48) -> int:
    """Move ``pos`` to the nearest line start in ``window`` within ``reach`` tokens, inside [lo, hi]."""
    for d in range(reach + 1):
        for p in (pos - d, pos + d):
            if lo <= p <= hi and (p == 0 or p == len(window) or ends_line[window[p - 1]]):
                return p
    return min(max(pos, lo), hi)


def make_sample(task: str, tokenizer, filler_ids: np.ndarray, seq_len: int, depth: float,
                rng: np.random.Generator, split: str = "eval", check_unique: bool = True,
                distractors: int | None = None) -> TaskSample:
    """Build one ``task`` prompt of exactly ``seq_len`` tokens with the queried needle at ``depth`` (0..1).

    ``filler_ids`` (N,) is a token stream of filler text; ``rng`` drives every choice, so the same seed gives
    the same prompt. ``split`` picks the key space (``"train"`` or ``"eval"``). ``distractors`` overrides
    the task's number of distractor needles / chains (training uses fewer to fit short prompts).
    """
    if task not in TASKS:
        raise BadInputError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise BadInputError(f"depth must be in [0, 1], got {depth}")
    enc = _Encoder.get(tokenizer)
    used: set[str] = set()
    if task == "passkey":
        key = _draw(rng, _digits(5), split, used)
        prefix, question, answer = PASSKEY_PREFIX, PASSKEY_QUESTION, key
        target = [PASSKEY_NEEDLE.format(key=key)]
        others: list[str] = []
        needles = [("pass key", key)]
    elif task in ("niah", "multikey"):
        n_dis = NIAH_DISTRACTORS if task == "niah" else MULTIKEY_DISTRACTORS
        n_dis = n_dis if distractors is None else distractors
        keys = [_draw(rng, _word, split, used) for _ in range(n_dis + 1)]
        values = [_draw(rng, _digits(7), split, used) for _ in range(n_dis + 1)]
        prefix, answer = NIAH_PREFIX, values[0]
        question = NIAH_QUESTION.format(key=keys[0])
        target = [NIAH_NEEDLE.format(key=keys[0], value=values[0])]
        others = [NIAH_NEEDLE.format(key=k, value=v) for k, v in zip(keys[1:], values[1:])]
        needles = list(zip(keys, values))
    else:
        names = [_draw(rng, _varname, split, used) for _ in range(2 * (VT_HOPS + 1))]
        value, other_value = _draw(rng, _digits(5), split, used), _draw(rng, _digits(5), split, used)
        chain, dchain = names[:VT_HOPS + 1], names[VT_HOPS + 1:]
        prefix, answer = VT_PREFIX, " ".join(chain)
        question = VT_QUESTION.format(value=value, n=len(chain))
        target = [VT_FIRST.format(name=chain[0], value=value)] + [
            VT_NEXT.format(name=n, prev=p) for p, n in zip(chain, chain[1:])]
        others = [VT_FIRST.format(name=dchain[0], value=other_value)] + [
            VT_NEXT.format(name=n, prev=p) for p, n in zip(dchain, dchain[1:])]
        if distractors == 0:
            others = []
        needles = []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    p_ids, q_ids = enc(prefix), enc(question)
    t_ids, o_ids = [enc(t) for t in target], [enc(o) for o in others]
    n_fill = seq_len - len(bos) - len(p_ids) - len(q_ids) - sum(map(len, t_ids)) - sum(map(len, o_ids))
    if n_fill < 8:
        raise BadInputError(f"seq_len {seq_len} is too short for task {task!r}; use at least "
                            f"{seq_len - n_fill + 8} tokens")
    if len(filler_ids) < n_fill:
        raise BadInputError(f"filler text has {len(filler_ids)} tokens, need {n_fill}; pass a longer corpus")
    for _ in range(20):
        off = int(rng.integers(0, len(filler_ids) - n_fill + 1))
        window = np.asarray(filler_ids[off:off + n_fill])
        if not check_unique or answer.split()[0] not in tokenizer.decode(window.tolist()):
            break
    # Target needle position; vt spreads its chain over [depth, 1] keeping assignment order. Snapping to a line
    # start may move a needle by at most 2% of the haystack, so depths stay uniform in short prompts too.
    reach = min(48, n_fill // 50)
    tpos = [_snap(int(round(depth * n_fill)), window, enc.ends_line, 0, n_fill, reach)]
    for _ in t_ids[1:]:
        lo = tpos[-1]
        tpos.append(_snap(int(rng.integers(lo, n_fill + 1)), window, enc.ends_line, lo, n_fill, reach))
    opos = [_snap(int(rng.integers(0, n_fill + 1)), window, enc.ends_line, 0, n_fill, reach) for _ in o_ids]
    if task == "vt":
        opos = sorted(opos)  # a chain must be assigned in order
    # Order by position; at equal positions targets go first so needle_pos is exact.
    inserts = sorted([(p, 0, i, ids) for i, (p, ids) in enumerate(zip(tpos, t_ids))]
                     + [(p, 1, i, ids) for i, (p, ids) in enumerate(zip(opos, o_ids))], key=lambda x: x[:3])
    hay: list[int] = []
    last = 0
    needle_pos = -1
    base = len(bos) + len(p_ids)
    for pos, kind, i, ids in inserts:
        hay.extend(window[last:pos].tolist())
        last = pos
        if kind == 0 and i == 0:
            needle_pos = base + len(hay)
        hay.extend(ids)
    hay.extend(window[last:].tolist())
    ids = bos + p_ids + hay + q_ids
    assert len(ids) == seq_len, (len(ids), seq_len)
    return TaskSample(task=task, seq_len=seq_len, depth=tpos[0] / n_fill, input_ids=ids, answer=answer,
                      answer_ids=enc(" " + answer), needle_pos=needle_pos,
                      meta={"requested_depth": depth, "needles": needles})


def make_samples(task: str, tokenizer, filler_ids: np.ndarray, seq_len: int, depths: Sequence[float],
                 n_per_depth: int, seed: int, split: str = "eval") -> list[TaskSample]:
    """``n_per_depth`` prompts per depth; sample ``j`` at depth ``d`` depends only on (task, seed, len, d, j)."""
    out = []
    for di, d in enumerate(depths):
        for j in range(n_per_depth):
            tag = int(hashlib.sha1(f"{task}:{seq_len}:{di}:{d}".encode()).hexdigest()[:8], 16)
            rng = np.random.default_rng([seed, tag, j, 0 if split == "eval" else 1])
            out.append(make_sample(task, tokenizer, filler_ids, seq_len, float(d), rng, split=split))
    return out
