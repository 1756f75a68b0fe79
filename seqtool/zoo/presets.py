"""Built-in model presets, built offline from stored configs.

- ``tiny-*``: 2-layer models (hidden 64) with random weights (seed 0) for tests; one per registry family.
- real-shape presets (``llama-3.2-1b``, ...): the public models' shapes with random weights, for profiling
  without downloading anything.
- ``ref``: the project's small trained reference model, a checkpoint directory shipped in ``seqtool/zoo/ref``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from seqtool.errors import BadInputError
from seqtool.zoo.byte_tokenizer import BYTE_VOCAB_SIZE, byte_level_tokenizer

# torch / transformers are imported inside the functions that build models: the CLI checks preset names
# (``is_preset``) before anything heavy is imported.

REF_DIR = Path(__file__).parent / "ref"
# The context ``ref`` was trained to (its curriculum and evals run at 2048 tokens; config max_position_embeddings is 8192).
REF_TRAINED_CONTEXT = 2048

_TINY_COMMON: dict[str, Any] = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    intermediate_size=128, vocab_size=BYTE_VOCAB_SIZE, max_position_embeddings=4096,
    bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)

TINY_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(model_type="llama", num_key_value_heads=4),
    "tiny-mistral": dict(model_type="mistral", sliding_window=None),
    "tiny-qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "tiny-qwen3": dict(model_type="qwen3"),
    "tiny-phi3": dict(model_type="phi3", num_key_value_heads=4),
}

REAL_SHAPE_PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(
        model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072,
        rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
    "llama-3.1-8b": dict(
        model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072,
        rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        intermediate_size=18944, vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0,
        tie_word_embeddings=False, rms_norm_eps=1e-6, sliding_window=None, use_sliding_window=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
    "mistral-7b": dict(
        model_type="mistral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, intermediate_size=14336, vocab_size=32768, max_position_embeddings=32768,
        rope_theta=1000000.0, tie_word_embeddings=False, rms_norm_eps=1e-5, sliding_window=None,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ),
}


def preset_names() -> list[str]:
    return [*TINY_PRESETS, *REAL_SHAPE_PRESETS, "ref"]


def is_preset(name: str) -> bool:
    return name in TINY_PRESETS or name in REAL_SHAPE_PRESETS or name == "ref"


def preset_config(name: str):
    """The transformers config of a random-weight preset."""
    if name in TINY_PRESETS:
        values = {**_TINY_COMMON, **TINY_PRESETS[name]}
    elif name in REAL_SHAPE_PRESETS:
        values = dict(REAL_SHAPE_PRESETS[name])
    else:
        raise BadInputError(f"unknown preset '{name}'; presets: {', '.join(preset_names())}")
    model_type = values.pop("model_type")
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **values)


def default_preset_dtype(name: str) -> "torch.dtype":
    """Tiny presets are fp32; real-shape presets are bf16 like the public checkpoints."""
    import torch

    return torch.float32 if name in TINY_PRESETS else torch.bfloat16


def build_preset(name: str, *, dtype: "torch.dtype | None" = None, device: "str | torch.device" = "cpu",
                 meta: bool = False) -> tuple[Any, Any]:
    """Build a random-weight preset (seed 0) directly on ``device``; ``meta=True`` allocates nothing."""
    import torch
    from transformers import AutoModelForCausalLM

    config = preset_config(name)
    dtype = dtype or default_preset_dtype(name)
    target = torch.device("meta") if meta else torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with target:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.generation_config.pad_token_id = config.pad_token_id
    return model, byte_level_tokenizer()
