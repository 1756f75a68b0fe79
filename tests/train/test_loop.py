"""The loop: bit-identical resume, resume with other arguments, disk full while checkpointing, what trains,
grad accumulation == one big batch, kind registration."""
from __future__ import annotations

import errno
import json

import pytest
import torch

from seqtool.arch.io import load_model
from seqtool.errors import BadInputError
from seqtool.train import kinds as kinds_mod
from seqtool.train.data import DataConfig, build_data
from seqtool.train.loop import CHECKPOINT, CheckpointWriteError, TrainConfig, Trainer
from seqtool.train.objectives import LMLoss
from seqtool.train.trainable import prepare


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tok = load_model("tiny-llama", device="cpu").tokenizer
    path = tmp_path_factory.mktemp("d") / "t.txt"
    path.write_text("".join(f"line {i} says {i * 7919 % 1000}\n" for i in range(300)))
    return build_data(tok, DataConfig(source=str(path), seq_len=32))


def _trainer(data, run_dir=None, resume=False, method="lora", kinds="attention,mlp", **cfg):
    model = prepare(load_model("tiny-llama", device="cpu", dtype="fp32").model, method, kinds)
    config = TrainConfig(**{"steps": 6, "batch": 4, "lr": 5e-3, "progress": "off", **cfg})
    return Trainer(model, data, [LMLoss()], config, run_dir=run_dir, resume=resume)


def _trained(trainer):
    return {n: p.detach().clone() for n, p in trainer.inner.named_parameters() if p.requires_grad}


def test_resume_is_bit_identical(tmp_path, data):
    straight = _trainer(data, save_every="2")
    full = straight.run()
    first = _trainer(data, tmp_path / "run", save_every="2")
    first.run(max_steps=3)  # "killed" after step 3 (checkpoint written when it stops)
    resumed = _trainer(data, tmp_path / "run", resume=True, save_every="2")
    out = resumed.run()
    assert out.resumed_from == 3 and out.steps == 6
    assert [r["loss"] for r in out.history] == [r["loss"] for r in full.history]
    a, b = _trained(straight), _trained(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))


def test_resume_with_other_arguments_or_existing_run_is_an_error(tmp_path, data):
    _trainer(data, tmp_path / "run", steps=2).run()
    with pytest.raises(BadInputError, match=r"different arguments \(config.lr"):
        _trainer(data, tmp_path / "run", resume=True, steps=2, lr=1e-3).run()
    with pytest.raises(BadInputError, match="already holds a run"):
        _trainer(data, tmp_path / "run", steps=2).run()
    with pytest.raises(BadInputError, match="no checkpoint"):
        _trainer(data, tmp_path / "empty", resume=True, steps=2).run()


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, data, monkeypatch):
    trainer = _trainer(data, tmp_path / "run", save_every="1", steps=4)
    trainer.run(max_steps=2)
    before = (tmp_path / "run" / CHECKPOINT).read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # half a file lands on disk, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    resumed = _trainer(data, tmp_path / "run", resume=True, save_every="1", steps=4)
    with pytest.raises(CheckpointWriteError, match="out of disk space.*previous checkpoint is intact") as err:
        resumed.run()
    assert err.value.exit_code == 1
    assert (tmp_path / "run" / CHECKPOINT).read_bytes() == before
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")] == []


def test_steps_zero_and_bad_batch_are_one_line_errors(data):
    with pytest.raises(BadInputError, match="--steps must be at least 1"):
        _trainer(data, steps=0)
    with pytest.raises(BadInputError, match="--save-every"):
        _trainer(data, save_every="soon")


def test_full_method_trains_exactly_the_chosen_kinds(data):
    trainer = _trainer(data, method="full", kinds="mlp,norm", steps=2)
    before = {n: p.detach().clone() for n, p in trainer.inner.named_parameters()}
    trainer.run()
    changed = {n for n, p in trainer.inner.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all(".mlp." in n or "norm" in n for n in changed)
    assert any(".mlp." in n for n in changed) and any("norm" in n for n in changed)


def test_grad_accumulation_equals_one_big_batch(data):
    big = _trainer(data, method="full", batch=4, grad_accum=1, steps=3).run()
    acc = _trainer(data, method="full", batch=2, grad_accum=2, steps=3).run()
    torch.testing.assert_close(torch.tensor([r["loss"] for r in acc.history]),
                               torch.tensor([r["loss"] for r in big.history]), rtol=1e-5, atol=1e-5)


def test_a_registered_kind_is_trainable(data):
    @kinds_mod.register_kind("qproj")
    def _q(model, spec):
        return [f"{spec.layers}.{i}.{spec.attention}.{spec.q_proj}" for i in range(model.config.num_hidden_layers)]

    try:
        trainer = _trainer(data, method="full", kinds="qproj", steps=1)
        names = [n for n, p in trainer.inner.named_parameters() if p.requires_grad]
        assert names and all("q_proj" in n for n in names)
        targets, full = kinds_mod.lora_plan(trainer.inner, "qproj,norm")
        assert all(t.endswith("q_proj") for t in targets) and all("norm" in f for f in full)
    finally:
        kinds_mod.MODULE_KINDS.pop("qproj")
    with pytest.raises(BadInputError, match="unknown module kind qproj"):
        kinds_mod.parse_kinds("qproj")


def test_gradient_checkpointing_gives_the_same_steps(data):
    plain = _trainer(data, method="full", steps=2).run()
    ckpt = _trainer(data, method="full", steps=2, grad_checkpoint=True).run()
    torch.testing.assert_close(torch.tensor([r["loss"] for r in ckpt.history]),
                               torch.tensor([r["loss"] for r in plain.history]), rtol=1e-6, atol=1e-6)
