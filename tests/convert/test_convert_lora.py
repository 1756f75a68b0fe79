"""Recovery on the training engine: merged LoRA == unmerged peft model; the saved peft adapter reproduces the
merged checkpoint; full/distill train exactly the modules the conversion changed."""
from __future__ import annotations

import json

import torch
from peft import PeftModel

import seqtool
from convert_helpers import CALIB, fresh, logits
from seqtool.arch.io import load_model
from seqtool.train.data import DataConfig, build_data
from seqtool.train.loop import TrainConfig, Trainer
from seqtool.train.objectives import LMLoss
from seqtool.train.trainable import merge, prepare

RECOVER = {"steps": 4, "recover_options": {"batch": 2, "seq_len": 32, "lr": 5e-3}}


def test_merged_lora_equals_unmerged_peft(ids):
    loaded = fresh("tiny-phi3")  # fused qkv_proj / gate_up_proj get adapters too
    base = logits(loaded.model, ids)
    data = build_data(loaded.tokenizer, DataConfig(seq_len=32, max_train_tokens=4096))
    peft_model = prepare(loaded.model, "lora", "attention,mlp")
    Trainer(peft_model, data, [LMLoss()], TrainConfig(steps=4, batch=2, lr=5e-3, progress="off")).run()
    unmerged = logits(peft_model, ids)
    assert (unmerged - base).abs().max() > 1e-4  # training moved the adapters off their zero init
    merged = merge(peft_model)
    torch.testing.assert_close(logits(merged, ids), unmerged, rtol=1e-5, atol=1e-5)


def test_recover_saves_a_peft_adapter_that_reproduces_the_merged_model(tmp_path, ids):
    out = tmp_path / "pruned-lora"
    result = seqtool.prune(fresh("tiny-qwen2"), 0.3, output=out, recover="lora", **CALIB, **RECOVER)
    assert result.recovery.adapter_dir == str(out / "lora_adapter")
    adapter_config = json.loads((out / "lora_adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 8
    step = json.loads((out / "config.json").read_text())["seqtool"]["steps"][-1]
    assert step["recover"]["method"] == "lora" and step["recover"]["steps"] == 4
    # The adapter applies to the model as pruned before recovery, which the same options reproduce.
    base = seqtool.prune(fresh("tiny-qwen2"), 0.3, **CALIB).model
    with_adapter = PeftModel.from_pretrained(base, out / "lora_adapter")
    merged = load_model(str(out), device="cpu").model
    torch.testing.assert_close(logits(with_adapter, ids), logits(merged, ids), rtol=1e-5, atol=1e-5)
    # Tied embeddings survive pruning + merging.
    assert merged.lm_head.weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()


def test_gqa_distill_trains_only_attention_and_lowers_kl():
    plain = seqtool.convert(fresh("tiny-llama"), "gqa", kv_heads=1)
    result = seqtool.convert(fresh("tiny-llama"), "gqa", kv_heads=1, recover="distill", steps=6,
                             recover_options={"batch": 2, "seq_len": 64, "lr": 3e-3, "bf16": "off",
                                              "mix_retrieval": 0.0, "long_seq_len": 128, "long_batch": 1})
    rec = result.recovery
    assert rec.method == "distill" and rec.target_modules == ["attention"]
    assert [o["name"] for o in rec.objectives] == ["kl", "match"] and rec.loss_end < rec.loss_start
    before, after = plain.model.state_dict(), result.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".self_attn." in k for k in changed)
