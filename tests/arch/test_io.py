import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import seqtool
from seqtool.arch.io import BACKUP_SUFFIX, load_model, save_model
from seqtool.errors import BadInputError, DeviceError, OutputExistsError, SeqtoolError, UnsupportedModelError
from seqtool.zoo.presets import TINY_PRESETS

IDS = torch.tensor([[1, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130, 5]])


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("name", list(TINY_PRESETS))
def test_round_trip_gives_identical_logits(tmp_path, name):
    loaded = load_model(name)
    out = save_model(loaded.model, loaded.tokenizer, tmp_path / "out", step={"op": "copy"})
    again = load_model(str(out))
    assert again.family == loaded.family
    assert torch.equal(_logits(loaded.model), _logits(again.model))
    assert [s["op"] for s in again.recipe] == ["copy"]
    assert "copy" in (out / "README.md").read_text()
    assert again.tokenizer.decode(again.tokenizer("hi there")["input_ids"], skip_special_tokens=True) == "hi there"
    if loaded.model.config.tie_word_embeddings:
        assert again.model.lm_head.weight.data_ptr() == again.model.model.embed_tokens.weight.data_ptr()


def test_bf16_stays_bf16_and_recipe_accumulates(tmp_path):
    loaded = load_model("tiny-llama", dtype="bf16")
    first = save_model(loaded.model, loaded.tokenizer, tmp_path / "a", step={"op": "one"})
    config = json.loads((first / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    again = load_model(str(first), dtype="auto", device="cpu")
    second = save_model(again.model, again.tokenizer, tmp_path / "b", step={"op": "two"}, source_dir=first)
    steps = json.loads((second / "config.json").read_text())["seqtool"]["steps"]
    assert [s["op"] for s in steps] == ["one", "two"]


def test_existing_output_needs_force(tmp_path):
    loaded = load_model("tiny-llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        save_model(loaded.model, loaded.tokenizer, out, step={"op": "x"})
    assert (out / "keep.txt").read_text() == "mine"
    save_model(loaded.model, loaded.tokenizer, out, step={"op": "x"}, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert not list(tmp_path.glob(".seqtool-tmp-*")) and not list(tmp_path.glob("*" + BACKUP_SUFFIX))


def test_input_is_protected_unless_in_place(tmp_path):
    loaded = load_model("tiny-llama")
    src = save_model(loaded.model, loaded.tokenizer, tmp_path / "src", step={"op": "a"})
    before = (src / "model.safetensors").read_bytes()
    again = load_model(str(src))
    with pytest.raises(OutputExistsError):
        save_model(again.model, again.tokenizer, src, step={"op": "b"}, source_dir=src, force=True)
    assert (src / "model.safetensors").read_bytes() == before
    save_model(again.model, again.tokenizer, src, step={"op": "b"}, source_dir=src, in_place=True)
    assert [s["op"] for s in load_model(str(src)).recipe] == ["a", "b"]


def test_leftover_backup_is_recovered(tmp_path):
    loaded = load_model("tiny-llama")
    src = save_model(loaded.model, loaded.tokenizer, tmp_path / "src", step={"op": "a"})
    backup = src.with_name(src.name + BACKUP_SUFFIX)
    os.replace(src, backup)  # a swap killed between its two renames
    assert load_model(str(src)).recipe[0]["op"] == "a"
    assert src.exists() and not backup.exists()


def test_nan_weights_are_refused(tmp_path):
    loaded = load_model("tiny-llama")
    with torch.no_grad():
        loaded.model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(SeqtoolError, match="NaN"):
        save_model(loaded.model, loaded.tokenizer, tmp_path / "out", step={"op": "x"})
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".seqtool-tmp-*"))


def test_bad_sources(tmp_path):
    with pytest.raises(BadInputError, match="no such directory"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(BadInputError, match="offline"):
        load_model("no-such-org/no-such-model")
    with pytest.raises(BadInputError, match="dtype"):
        load_model("tiny-llama", dtype="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError):
            load_model("tiny-llama", device="cuda")
    for name, extra in [("gpt2", {"model_type": "gpt2"}),
                        ("quant", {"model_type": "llama", "quantization_config": {"quant_method": "gptq"}}),
                        ("remote", {"model_type": "my_custom", "auto_map": {"AutoModelForCausalLM": "x.Y"}})]:
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps(extra))
        with pytest.raises(UnsupportedModelError):
            load_model(str(path))
    pickled = tmp_path / "pickled"
    loaded = load_model("tiny-llama")
    loaded.model.config.save_pretrained(pickled)
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(UnsupportedModelError, match="pickle"):
        load_model(str(pickled))


def test_hub_id_resolves_from_local_cache(tmp_path, monkeypatch):
    """A hub id that is in the local Hugging Face cache loads offline (cache layout: refs/main → snapshot)."""
    loaded = load_model("tiny-mistral")
    repo = tmp_path / "hub" / "models--someorg--tiny"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    save_model(loaded.model, loaded.tokenizer, snapshot, step={"op": "cached"})
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    again = load_model("someorg/tiny")
    assert torch.equal(_logits(again.model), _logits(loaded.model))


def test_device_map_goes_through_accelerate(tmp_path):
    loaded = load_model("tiny-llama")
    src = save_model(loaded.model, loaded.tokenizer, tmp_path / "src", step={"op": "a"})
    again = load_model(str(src), device_map="auto")
    assert torch.equal(_logits(again.model), _logits(loaded.model))
