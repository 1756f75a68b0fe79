"""Per-layer description: layer kinds from family data, KV bytes and active parameters for MoE / BAM."""
from __future__ import annotations

import subprocess
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from seqtool.arch.registry import LayerKind, kv_cache_bytes_per_token, layer_kinds, parameter_counts
from seqtool.zoo.presets import preset_config


def _meta(model_type: str, **values):
    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, **values)
    with torch.device("meta"):
        return config, AutoModelForCausalLM.from_config(config)


def test_dense_families_are_plain_attention():
    for name in ("tiny-llama", "tiny-qwen2", "tiny-phi3"):
        assert layer_kinds(preset_config(name)) == [LayerKind()] * 2


def test_qwen2_moe_dense_layers_and_active_params():
    config, model = _meta("qwen2_moe", intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                          num_experts_per_tok=1, shared_expert_intermediate_size=8, mlp_only_layers=[1])
    kinds = layer_kinds(config)
    assert [k.ffn for k in kinds] == ["moe", "dense", "moe", "moe"] and kinds[0].describe() == "attention + moe 4/top-1"
    total, active = parameter_counts(model)
    expert = 3 * 32 * 16  # gate, up, down of one expert
    assert total - active == 3 * 3 * expert  # 3 MoE layers x 3 idle experts
    assert kv_cache_bytes_per_token(config, 2) == 4 * 2 * 2 * 8 * 2
    from seqtool.profile.flops import flop_shape

    matrices = sum(p.numel() for layer in model.model.layers for p in layer.parameters() if p.dim() == 2)
    assert flop_shape(model).layer_params == matrices + 3 * expert  # 2-D weights + one active expert per MoE layer


def test_bam_kv_sets_and_lazy_registration():
    from seqtool.models import SeqtoolBamConfig

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, num_local_experts=3, num_attention_experts=3)
    full, shared = SeqtoolBamConfig(**common), SeqtoolBamConfig(**common, attention_kv_shared=True)
    assert layer_kinds(full)[0].kv_sets == 3 and layer_kinds(shared)[0].kv_sets == 1
    assert kv_cache_bytes_per_token(full, 4) == 3 * kv_cache_bytes_per_token(shared, 4) == 3 * 2 * 2 * 2 * 8 * 4
    code = "import sys, seqtool; assert 'seqtool.models' not in sys.modules and 'transformers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
