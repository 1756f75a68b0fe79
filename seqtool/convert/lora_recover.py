"""``--recover lora``: a short LoRA fine-tune (peft) on built-in text after a conversion, merged into the weights.

LoRA adapters go on every attention and MLP projection the family registry names (fused ones included). The
adapter is saved in standard peft format before merging (``adapter_dir``): it applies to the converted model as
it was *before* recovery, which the same command without ``--recover`` reproduces exactly (fixed seeds).
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from seqtool.arch.registry import get_family
from seqtool.convert.base import RecoveryResult
from seqtool.convert.calib import calibration_ids


def lora_targets(model: nn.Module) -> list[str]:
    """Projection module names (relative to attention / MLP) that get LoRA adapters."""
    spec = get_family(model)
    names = [spec.qkv_proj] if spec.fused_qkv else [spec.q_proj, spec.k_proj, spec.v_proj]
    names += [spec.o_proj]
    names += [spec.gate_up_proj] if spec.fused_gate_up else [spec.gate_proj, spec.up_proj]
    names += [spec.down_proj]
    return names


def train_lora(model: nn.Module, tokenizer, *, steps: int = 100, rank: int = 8, alpha: int = 16, lr: float = 1e-3,
               batch_size: int = 4, seq_len: int = 256, seed: int = 0, text_path: str | Path | None = None):
    """Wrap ``model`` with LoRA adapters (peft, in place) and train them; returns (peft_model, losses)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=lora_targets(model),
                        bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft calls a transformers API that is deprecated in 5.x (harmless)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    # Recovery windows are drawn with a different seed than calibration so they are not the same text.
    data = calibration_ids(tokenizer, path=text_path, samples=max(steps, 1) * batch_size, seq_len=seq_len,
                           seed=seed + 1)
    device = next(model.parameters()).device
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    peft_model.train()
    for step in range(steps):
        batch = data[step * batch_size:(step + 1) * batch_size].to(device)
        loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    peft_model.eval()
    return peft_model, losses


def recover_lora(model: nn.Module, tokenizer, *, steps: int = 100, rank: int = 8, alpha: int = 16,
                 lr: float = 1e-3, batch_size: int = 4, seq_len: int = 256, seed: int = 0,
                 adapter_dir: str | Path | None = None, text_path: str | Path | None = None) -> RecoveryResult:
    """Train LoRA on ``model`` for ``steps`` steps of (batch_size, seq_len) tokens, save the adapter to
    ``adapter_dir`` (peft format) if given, then merge it into ``model``'s weights in place."""
    started = time.perf_counter()
    was_training = model.training
    peft_model, losses = train_lora(model, tokenizer, steps=steps, rank=rank, alpha=alpha, lr=lr,
                                    batch_size=batch_size, seq_len=seq_len, seed=seed, text_path=text_path)
    if adapter_dir is not None:
        peft_model.save_pretrained(str(adapter_dir))
    merged = peft_model.merge_and_unload()
    if merged is not model:  # peft injects in place; the unwrapped model must be the caller's object
        raise RuntimeError("peft returned a different model object after merging")
    model.train(was_training)
    for p in model.parameters():
        p.requires_grad_(True)
    tenth = max(1, len(losses) // 10)
    return RecoveryResult(
        method="lora", steps=steps, rank=rank, alpha=alpha, lr=lr, batch_size=batch_size, seq_len=seq_len,
        target_modules=lora_targets(model),
        loss_start=round(sum(losses[:tenth]) / tenth, 4) if losses else float("nan"),
        loss_end=round(sum(losses[-tenth:]) / tenth, 4) if losses else float("nan"),
        seconds=round(time.perf_counter() - started, 3),
        adapter_dir=str(adapter_dir) if adapter_dir is not None else None,
    )
