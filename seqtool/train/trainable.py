"""What trains: ``method`` (``lora`` | ``full``) × module kinds (:mod:`seqtool.train.kinds`).

``full`` freezes everything except the parameters of the kinds' modules. ``lora`` wraps the model with peft
adapters on the kinds' projections (``lora_plan``); modules without projections (norms) train fully through
``modules_to_save``. After training :func:`merge` folds the adapters into the weights (exactly what the unmerged
model computes) and returns the plain transformers model.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from seqtool.errors import BadInputError
from seqtool.train.kinds import kind_modules, lora_plan, parse_kinds

METHODS = ("lora", "full")
DEFAULT_LR = {"lora": 1e-3, "full": 1e-4}


@dataclass
class LoraOptions:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0


def prepare(model: nn.Module, method: str, kinds: str | list[str], lora: LoraOptions | None = None,
            seed: int = 0) -> nn.Module:
    """Make exactly ``kinds`` trainable with ``method``; returns the model to train (a peft model for lora).
    LoRA's random init uses ``seed`` (the global RNG is left as it was)."""
    if method not in METHODS:
        raise BadInputError(f"unknown --method '{method}'; use {' or '.join(METHODS)}")
    kinds = parse_kinds(kinds)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(False)
        for names in kind_modules(model, kinds).values():
            for name in names:
                for p in model.get_submodule(name).parameters():
                    p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lora = lora or LoraOptions()
    targets, full = lora_plan(model, kinds)
    if not targets and not full:
        raise BadInputError(f"kinds {','.join(kinds)} select no modules in this model")
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets or None,
                        modules_to_save=full or None, bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.filterwarnings("ignore", category=FutureWarning)  # peft calls an API deprecated in 5.x
        warnings.filterwarnings("ignore", category=UserWarning)
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for _, p in trainable_parameters(model)), total


def save_adapter(model: nn.Module, out_dir: str | Path) -> Path:
    """Write the peft adapter (standard ``adapter_config.json`` + ``adapter_model.safetensors``)."""
    if not is_peft(model):
        raise BadInputError("--save-adapter needs --method lora")
    model.save_pretrained(str(out_dir))
    return Path(out_dir)


def merge(model: nn.Module) -> nn.Module:
    """Fold LoRA into the base weights and unwrap; a full-trained model is returned as is. All params trainable
    again afterwards (the model leaves training as it came)."""
    if is_peft(model):
        model = model.merge_and_unload()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model
