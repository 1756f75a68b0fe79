import json

import pytest

from seqtool.arch.registry import all_families, get_family, head_counts, kv_cache_bytes_per_token
from seqtool.errors import UnsupportedModelError
from seqtool.zoo.presets import TINY_PRESETS, preset_config


@pytest.mark.parametrize("name", list(TINY_PRESETS))
def test_every_tiny_preset_has_a_family(name):
    config = preset_config(name)
    spec = get_family(config)
    assert config.model_type in spec.model_types
    heads, kv_heads, head_dim = head_counts(config)
    assert heads % kv_heads == 0 and head_dim * heads == config.hidden_size


def test_fused_layouts_are_data():
    families = all_families()
    assert families["phi3"].fused_qkv and families["phi3"].fused_gate_up
    assert not families["llama"].fused_qkv
    assert families["qwen3"].qk_norms == ("q_norm", "k_norm")


def test_unknown_family_lists_supported_ones():
    with pytest.raises(UnsupportedModelError) as info:
        get_family({"model_type": "gpt2"})
    message = str(info.value)
    assert "gpt2" in message and "llama" in message and "phi3" in message


def test_kv_bytes_formula():
    config = preset_config("tiny-mistral")
    # 2 layers x 2 (k and v) x 2 kv heads x 16 head_dim x 4 bytes
    assert kv_cache_bytes_per_token(config, 4) == 2 * 2 * 2 * 16 * 4
