"""Data: every source kind reads through datasets, packing with separators, seeded split, step rows, errors."""
from __future__ import annotations

import json

import pytest
import torch

from seqtool.arch.io import load_model
from seqtool.errors import BadInputError
from seqtool.train.data import DataConfig, LengthSchedule, build_data, pack


@pytest.fixture(scope="module")
def tok():
    return load_model("tiny-llama", device="cpu").tokenizer


def test_pack_separates_documents_and_drops_the_tail():
    rows = pack([[5, 6, 7], [8, 9]], 4, bos=1, eos=2)
    assert rows.tolist() == [[1, 5, 6, 7], [2, 1, 8, 9]]  # the last eos does not fill a row: dropped


def test_sources_text_dir_jsonl_and_save_to_disk_give_the_same_rows(tmp_path, tok):
    import datasets

    docs = [f"document number {i} " * 30 for i in range(6)]
    (tmp_path / "one.txt").write_text(docs[0])
    d = tmp_path / "dir"
    d.mkdir()
    for i, t in enumerate(docs):
        (d / f"{i:02d}.txt").write_text(t)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs)))
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    rows = {}
    for name in ("dir", "d.jsonl", "saved"):
        data = build_data(tok, DataConfig(source=str(tmp_path / name), seq_len=64, heldout=0.1))
        rows[name] = torch.cat([data.train, data.heldout]).sort(dim=0).values
        assert data.info["documents"] == 6 and data.heldout.shape[0] >= 1
    assert torch.equal(rows["dir"], rows["d.jsonl"]) and torch.equal(rows["dir"], rows["saved"])
    one = build_data(tok, DataConfig(source=str(tmp_path / "one.txt"), seq_len=64))
    assert one.info["documents"] == 1


def test_cache_split_and_step_rows_are_deterministic(tmp_path, tok):
    domain_file = tmp_path / "lines.txt"
    domain_file.write_text("".join(f"line {i} says {i * 7919 % 1000}\n" for i in range(400)))
    cfg = DataConfig(source=str(domain_file), seq_len=32, seed=3)
    a = build_data(tok, cfg, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("rows-*.pt"))) == 1
    b = build_data(tok, cfg, tmp_path / "cache")  # from the cache
    c = build_data(tok, cfg)  # rebuilt
    assert a.fingerprint == b.fingerprint == c.fingerprint and torch.equal(a.heldout, c.heldout)
    assert not set(map(tuple, a.heldout.tolist())) & set(map(tuple, a.train.tolist()))
    steps = [a.step_rows(s, m, 4, 2, seed=0) for s in range(3) for m in range(2)]
    assert torch.equal(torch.cat(steps), torch.cat([a.step_rows(s, m, 4, 2, seed=0) for s in range(3) for m in range(2)]))
    assert len(set(torch.cat(steps).tolist())) == 24  # one epoch: no row twice
    other = build_data(tok, DataConfig(source=str(domain_file), seq_len=32, seed=4))
    assert other.fingerprint != a.fingerprint


def test_mix_retrieval_adds_answered_prompts_with_padding_masked(tok):
    data = build_data(tok, DataConfig(seq_len=640, mix_retrieval=0.3, max_train_tokens=640 * 14))
    n_ret = data.info["retrieval_rows"]
    assert n_ret == 6 and data.train_labels is not None
    ret_labels = data.train_labels[-n_ret:]
    assert (ret_labels == -100).any() and torch.equal(data.train_labels[:-n_ret], data.train[:-n_ret])
    text = tok.decode(data.train[-1][ret_labels[-1] != -100])
    assert "?" in text  # a question followed by its answer
    # The answer mask marks exactly the answer tokens of the retrieval rows (then eos): none in text rows.
    assert data.train_answers is not None and not data.train_answers[:-n_ret].any()
    for row in range(n_ret):
        ids, ans = data.train[-n_ret + row], data.train_answers[-n_ret + row]
        pos = ans.nonzero()[:, 0]
        assert len(pos) > 0 and torch.equal(pos, torch.arange(int(pos[0]), int(pos[-1]) + 1))
        assert int(ids[int(pos[-1]) + 1]) == tok.eos_token_id  # the answer is the end of the prompt
    mb = data.micro_batches(0, 1, 4, seed=0)[0]
    assert torch.equal(mb["answer_mask"], data.train_answers[data.step_rows(0, 0, 4, 1, 0)])


def test_length_schedule_takes_each_phase_rows_from_its_own_start(tok):
    short = build_data(tok, DataConfig(seq_len=32, max_train_tokens=32 * 40))
    long = build_data(tok, DataConfig(seq_len=128, max_train_tokens=128 * 10))
    sched = LengthSchedule([short, long], [4, 1], [3, 5])
    for step in range(3):
        assert torch.equal(sched.micro_batches(step, 2, 99, seed=1)[1]["input_ids"],
                           short.micro_batches(step, 2, 4, seed=1)[1]["input_ids"])
    for step in (3, 4):
        got = sched.micro_batches(step, 1, 99, seed=1)[0]["input_ids"]
        assert got.shape == (1, 128) and torch.equal(got, long.micro_batches(step - 3, 1, 1, seed=1)[0]["input_ids"])
    assert torch.equal(sched.heldout, short.heldout) and sched.fingerprint != short.fingerprint
    assert [p["seq_len"] for p in sched.info["schedule"]] == [32, 128]
    with pytest.raises(BadInputError):
        LengthSchedule([short, long], [4, 1], [3, 3])


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "missing.txt"), "does not exist"),
    (lambda p: (p / "empty.txt").write_text("") and None or str(p / "empty.txt"), "empty"),
    (lambda p: (p / "short.txt").write_text("tiny") and None or str(p / "short.txt"), "fewer than two rows"),
    (lambda p: (p / "x.jsonl").write_text('{"body": "abc"}\n') and None or str(p / "x.jsonl"), "no 'text' field"),
    (lambda p: "someone/never-downloaded", "local Hugging Face cache"),
])
def test_bad_data_is_a_one_line_error(tmp_path, tok, make, message):
    with pytest.raises(BadInputError, match=message) as err:
        build_data(tok, DataConfig(source=make(tmp_path), seq_len=64))
    assert "\n" not in str(err.value)
