"""Test helpers: tiny models and a dense reference attention masked to recorded selections."""
from __future__ import annotations

import torch
from transformers import AttentionInterface

from seqtool.kernels.block_sparse.reference import masked_attention_reference
from seqtool.zoo.presets import build_preset

REF_NAME = "seqtool_test_masked_ref"
_MASKS: dict[int, torch.Tensor] = {}


def tiny(name: str = "tiny-qwen2"):
    """A tiny preset, or ``odd-D``: a Llama with 6 query heads over 3 KV heads and head_dim ``D`` (odd shapes)."""
    if name.startswith("odd-"):
        return odd_model(int(name[4:]))
    model, _ = build_preset(name, dtype=torch.float32)
    return model.eval()


def odd_model(head_dim: int = 16):
    """2-layer Llama, 6 query heads / 3 KV heads (groups of 2, head counts not powers of two), ``head_dim``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
                         head_dim=head_dim, intermediate_size=128, vocab_size=260, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def _masked_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    entry = _MASKS[module.layer_idx]  # (B, Hq, Tq, Tk) bool, or (mask, key shift (B, Hq, Tq, Tk), inv_freq)
    mask, shift, inv_freq = entry if isinstance(entry, tuple) else (entry, None, None)
    out, _ = masked_attention_reference(query, key, value, mask, scaling, shift, inv_freq)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(REF_NAME, _masked_attention)


def masked_forward(model, input_ids: torch.Tensor, masks: dict[int, torch.Tensor]) -> torch.Tensor:
    """Logits of an unpatched ``model`` whose every layer attends exactly ``masks[layer]``."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionMaskInterface.register(REF_NAME, sdpa_mask)
    previous = model.config._attn_implementation
    _MASKS.clear()
    _MASKS.update(masks)
    try:
        model.set_attn_implementation(REF_NAME)
        with torch.no_grad():
            return model(input_ids).logits
    finally:
        model.set_attn_implementation(previous)


def stitched_masks(records: dict, total: int) -> dict:
    """Full (B, Hq, total, total) masks per layer from recorded calls (no padding, no eviction); a layer whose
    selections re-encode positions gets (mask, key shift, inv_freq) instead."""
    out = {}
    for layer, recs in records.items():
        first = recs[0].selection.mask()
        b, h = first.shape[:2]
        full = torch.zeros(b, h, total, total, dtype=torch.bool)
        shift = torch.zeros(b, h, total, total, dtype=torch.long)
        inv_freq = None
        for rec in recs:
            m = rec.selection.mask()
            tq, tk = m.shape[-2:]
            full[:, :, tk - tq : tk, :tk] = m
            ks = getattr(rec.selection, "key_shift", lambda: None)()
            if ks is not None:
                shift[:, :, tk - tq : tk, :tk] = ks
                inv_freq = rec.selection.rope_inv_freq
        out[layer] = full if inv_freq is None else (full, shift, inv_freq)
    return out
