import numpy as np
import pytest

from seqtool.errors import BadInputError
from seqtool.eval.tasks import (NIAH_NEEDLE, PASSKEY_NEEDLE, TASKS, key_split, make_sample, make_samples)


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_and_exact_length(task, byte_tok, filler):
    a = make_samples(task, byte_tok, filler, 1200, [0.0, 0.5, 1.0], 2, seed=3)
    b = make_samples(task, byte_tok, filler, 1200, [0.0, 0.5, 1.0], 2, seed=3)
    c = make_samples(task, byte_tok, filler, 1200, [0.0, 0.5, 1.0], 2, seed=4)
    assert [s.input_ids for s in a] == [s.input_ids for s in b]
    assert [s.input_ids for s in a] != [s.input_ids for s in c]
    for s in a:
        assert len(s.input_ids) == 1200
        assert s.input_ids[0] == byte_tok.bos_token_id
        assert byte_tok.decode(s.answer_ids) == " " + s.answer


@pytest.mark.parametrize("task", ["passkey", "niah", "multikey"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.75, 1.0])
def test_answer_once_at_depth(task, depth, byte_tok, filler):
    s = make_samples(task, byte_tok, filler, 1500, [depth], 1, seed=1)[0]
    text = byte_tok.decode(s.input_ids, skip_special_tokens=True)
    assert text.count(s.answer) == 1
    # The queried needle starts exactly at needle_pos ...
    needle = byte_tok.decode(s.input_ids[s.needle_pos:], skip_special_tokens=True)
    if task == "passkey":
        assert needle.startswith(PASSKEY_NEEDLE.format(key=s.answer))
    else:
        assert needle.startswith(NIAH_NEEDLE.split("{key}")[0]) and f"is: {s.answer}." in needle.split("\n")[0]
    # ... at the requested relative position of the haystack (snapped to a line start within 48 tokens).
    assert abs(s.depth - depth) <= 48 / 1000
    assert 0 < s.needle_pos < len(s.input_ids)


@pytest.mark.parametrize("task", ["passkey", "niah", "multikey"])
def test_needles_listed_queried_first(task, byte_tok, filler):
    s = make_samples(task, byte_tok, filler, 1500, [0.4], 1, seed=6)[0]
    text = byte_tok.decode(s.input_ids, skip_special_tokens=True)
    needles = s.meta["needles"]
    assert needles[0][1] == s.answer
    assert len(needles) == {"passkey": 1, "niah": 2, "multikey": 8}[task]
    template = PASSKEY_NEEDLE if task == "passkey" else NIAH_NEEDLE
    for key, value in needles[1:]:
        assert template.format(key=key, value=value) in text


def test_vt_chain_order_and_answer(byte_tok, filler):
    s = make_samples("vt", byte_tok, filler, 1500, [0.2], 1, seed=2)[0]
    text = byte_tok.decode(s.input_ids, skip_special_tokens=True)
    names = s.answer.split()
    assert len(names) == 3
    first = text.index(f"VAR {names[0]} = ")
    assert first < text.index(f"VAR {names[1]} = VAR {names[0]}") < text.index(f"VAR {names[2]} = VAR {names[1]}")


def test_key_spaces_disjoint(byte_tok, filler):
    ev = make_samples("multikey", byte_tok, filler, 1200, [0.5], 3, seed=0, split="eval")
    tr = make_samples("multikey", byte_tok, filler, 1200, [0.5], 3, seed=0, split="train")
    assert all(key_split(s.answer) == "eval" for s in ev)
    assert all(key_split(s.answer) == "train" for s in tr)


def test_too_short_is_bad_input(byte_tok, filler):
    with pytest.raises(BadInputError):
        make_sample("multikey", byte_tok, filler, 200, 0.5, np.random.default_rng(0))
