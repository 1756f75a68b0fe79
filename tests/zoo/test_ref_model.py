"""The committed reference model: shape, size, tokenizer, and that it loads as the preset `ref` and as a path."""
from pathlib import Path

import pytest
import torch

REF = Path(__file__).resolve().parents[2] / "seqtool" / "zoo" / "ref"
pytestmark = pytest.mark.skipif(not (REF / "model.safetensors").exists(), reason="reference model not exported")


def test_ref_files_and_shape():
    from transformers import AutoConfig, AutoTokenizer

    assert (REF / "model.safetensors").stat().st_size <= 30 * 2**20
    for name in ("config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert (REF / name).exists()
    cfg = AutoConfig.from_pretrained(REF)
    assert cfg.model_type == "llama" and cfg.num_hidden_layers >= 4
    assert cfg.num_key_value_heads == cfg.num_attention_heads and cfg.head_dim >= 32
    assert cfg.max_position_embeddings >= 2048
    tok = AutoTokenizer.from_pretrained(REF)
    assert 4096 <= len(tok) <= 8192 and tok.bos_token_id is not None and tok.pad_token_id is not None


def test_ref_loads_as_preset_and_generates():
    from seqtool.arch.io import load_model
    from seqtool.eval.generate import greedy_generate

    loaded = load_model("ref", dtype="fp32", device="cpu")
    tok = loaded.tokenizer
    ids = [tok.bos_token_id] + tok.encode("def add(a, b):\n    return", add_special_tokens=False)
    out = greedy_generate(loaded.model, [ids], 4, pad_id=tok.pad_token_id)[0]
    assert len(out) == 4
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([ids])).logits
    assert torch.isfinite(logits).all()
