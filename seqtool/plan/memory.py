"""Byte counts the plan adds up: what a step holds at once, per phase, from shapes alone.

Every function takes a config (or a meta model) and sizes; nothing is allocated. ``b`` is the element size of the
compute dtype. The terms and why they are there are listed in docs/memory_plan.md; the forward-pass terms reuse
:func:`seqtool.profile.estimate.layer_activation_bytes` (what ``seqtool profile`` checks against free memory).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from seqtool.arch.registry import config_value, head_counts, kv_cache_bytes_per_token, layer_kinds
from seqtool.profile.estimate import layer_activation_bytes

# A fast (Rust) tokenizer's encoding holds per token an id, type id, token string, offsets and masks (~92 B);
# handed to Python, the ids and the attention mask become lists (8 B pointers each) of int objects, of which only
# ids above 256 are new objects (28 B: CPython shares the small ints).
ENCODING_BYTES_PER_TOKEN = 92
INT_OBJECT_BYTES = 28


def id_list_bytes(large_id_share: float) -> float:
    """Bytes per token of a Python list of token ids (``large_id_share``: the share of ids above 256)."""
    return 8 + INT_OBJECT_BYTES * large_id_share


ATTENTION_PROJ = ("q", "k", "v", "o")
MLP_PROJ = ("gate", "up", "down")


@dataclass
class Phase:
    """What is alive at one moment of a step: ``parts`` name → bytes."""

    name: str
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def peak(phases: list[Phase]) -> Phase:
    """The phase with the most bytes alive (the step's peak)."""
    return max(phases, key=lambda p: p.total)


def weight_bytes(model: Any) -> int:
    """Parameters (tied ones once) and buffers of a (meta) model, in its dtype."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params + buffers


def largest_tensor(model: Any) -> tuple[int, int]:
    """(elements, bytes) of the model's largest parameter."""
    p = max(model.parameters(), key=lambda t: t.numel())
    return p.numel(), p.numel() * p.element_size()


def dims(config: Any) -> tuple[int, int, int, int, int, int, int]:
    """(layers, hidden, heads, kv_heads, head_dim, intermediate, vocab)."""
    heads, kv_heads, head_dim = head_counts(config)
    return (len(layer_kinds(config)), int(config_value(config, "hidden")), heads, kv_heads, head_dim,
            int(config_value(config, "intermediate")), int(config.vocab_size))


def kv_bytes(config: Any, *, tokens: int, batch: int, b: int) -> int:
    """Dense KV cache of ``batch`` sequences of ``tokens`` (the registry's per-token size)."""
    return kv_cache_bytes_per_token(config, b) * tokens * batch


def forward_bytes(config: Any, *, batch: int, seq_len: int, b: int, attn: str | None = None) -> int:
    """One decoder layer's transient tensors in a no-grad forward (see ``layer_activation_bytes``)."""
    return layer_activation_bytes(config, batch=batch, seq_len=seq_len, bytes_per_element=b, attn=attn)


def training_saved_bytes_per_token(config: Any, *, b: int, lora_rank: int | None, adapted: set[str],
                                   adapter_b: int, full_kinds: set[str]) -> int:
    """Bytes one decoder layer keeps for the backward pass per token (Llama-style layer, sdpa attention).

    - two RMSNorms: each keeps its input in fp32 (the residual stream itself when the model is fp32);
    - attention: RoPE'd q and k, v, the attention output, the fp32 log-sum-exp per head;
    - MLP: gate (SiLU's input), act(gate) and up (the product's inputs);
    - trained projections keep their inputs (frozen ones keep none): once per distinct tensor (the q/k/v input,
      o_proj's, gate/up's, down_proj's), or, when LoRA adapters run in another dtype than the model (peft keeps
      them in fp32 on a bf16 model), each adapter its own cast copy; plus each adapter's rank-r intermediate.
    """
    _, hidden, heads, kv_heads, head_dim, inter, _ = dims(config)
    q, kv = heads * head_dim, kv_heads * head_dim
    total = 2 * hidden * 4
    total += (2 * q + 2 * kv) * b + heads * 4
    total += 3 * inter * b
    inputs = {"q": hidden, "k": hidden, "v": hidden, "o": q, "gate": hidden, "up": hidden, "down": inter}
    source = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "gate": "gate_up", "up": "gate_up", "down": "down"}
    trained = set(adapted)
    if "attention" in full_kinds:
        trained |= set(ATTENTION_PROJ)
    if "mlp" in full_kinds:
        trained |= set(MLP_PROJ)
    if lora_rank and adapter_b != b:
        total += sum(inputs[name] for name in adapted) * adapter_b
        trained -= adapted
    total += sum({source[name]: inputs[name] for name in trained}.values()) * b
    if lora_rank:
        total += len(adapted) * lora_rank * adapter_b
    return total


def lora_params(config: Any, rank: int, kinds: list[str]) -> tuple[int, set[str]]:
    """(LoRA parameters, adapted projection names) for LoRA of ``rank`` on the attention / MLP projections."""
    n_layers, hidden, heads, kv_heads, head_dim, inter, _ = dims(config)
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = {"q": (hidden, q), "k": (hidden, kv), "v": (hidden, kv), "o": (q, hidden),
              "gate": (hidden, inter), "up": (hidden, inter), "down": (inter, hidden)}
    adapted: set[str] = set()
    if "attention" in kinds:
        adapted |= set(ATTENTION_PROJ)
    if "mlp" in kinds:
        adapted |= set(MLP_PROJ)
    per_layer = sum(rank * (shapes[n][0] + shapes[n][1]) for n in adapted)
    return n_layers * per_layer, adapted


def loss_bytes(tokens: int, vocab: int, b: int) -> int:
    """The LM head and cross-entropy of ``tokens`` positions at the start of the backward pass: the logits
    (model dtype, held by the output), the fp32 log-softmax (saved), its gradient and the gradient of its fp32
    input (the fp32 copy of bf16 logits is not saved)."""
    return tokens * vocab * (b + 4 + 4 + 4)


def tokenize_bytes(chars: int, chars_per_token: float, large_id_share: float) -> int:
    """A fast tokenizer's memory for ``chars`` characters tokenized in one call: the text, the encodings and the
    id and attention-mask lists."""
    per_token = ENCODING_BYTES_PER_TOKEN + id_list_bytes(large_id_share) + 8
    return int(chars / max(chars_per_token, 1e-9) * per_token) + chars


__all__ = ["Phase", "peak", "weight_bytes", "largest_tensor", "dims", "kv_bytes", "forward_bytes",
           "training_saved_bytes_per_token", "lora_params", "loss_bytes", "tokenize_bytes"]
