"""Seed models for MoE / BAM upcycling: resolve them, check they fit together, and say which seed fills which expert.

Seeds are checkpoints (or presets) of one family and shape sharing a tokenizer: typically copies of one model
fine-tuned on different data (Branch-Train-Mix), or a single model (sparse upcycling). Expert ``e`` comes from
seed ``e % len(seeds)``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqtool.arch.registry import FamilySpec, get_family, layer_kinds
from seqtool.arch.stream import SafetensorsSource, StateDictSource, TensorSource
from seqtool.errors import BadInputError

# Config values that must agree between seeds (registry keys) besides the vocabulary size.
_SHAPE_KEYS = ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate")


@dataclass
class Seed:
    """One seed: where it comes from, its config (as a dict) and its tensors, read lazily."""

    source: str
    config: dict
    path: Path | None
    tensors: TensorSource
    _loaded: Any = field(default=None, repr=False)

    @property
    def spec(self) -> FamilySpec:
        return get_family(self.config)

    def load(self, dtype: str = "fp32"):
        """The seed as a :class:`~seqtool.arch.io.LoadedModel` (for the hidden-state router and BAM)."""
        from seqtool.arch.io import load_model

        if self._loaded is None:
            self._loaded = load_model(self.source, dtype=dtype, device="cpu", apply_recipe=False)
        return self._loaded

    def tokenizer_fingerprint(self) -> str:
        if self.path is not None and (self.path / "tokenizer.json").exists():
            return hashlib.sha1((self.path / "tokenizer.json").read_bytes()).hexdigest()
        vocab = self.load().tokenizer.get_vocab()
        return hashlib.sha1(json.dumps(sorted(vocab.items())).encode()).hexdigest()


def open_seed(source: Any) -> Seed:
    """A seed from a checkpoint directory (tensors streamed from disk), a preset, or a LoadedModel / model."""
    from seqtool.arch.io import LoadedModel, resolve_source

    if isinstance(source, (str, Path)):
        resolved = resolve_source(str(source))
        if isinstance(resolved, Path):
            config = json.loads((resolved / "config.json").read_text())
            get_family(config)
            return Seed(str(source), config, resolved, SafetensorsSource(resolved))
        from seqtool.arch.io import load_model

        loaded = load_model(resolved, dtype="auto", device="cpu", apply_recipe=False)
    elif isinstance(source, LoadedModel):
        loaded = source
    else:
        loaded = LoadedModel(source, None, getattr(source.config, "_name_or_path", "") or "<in-memory model>")
    model = loaded.model
    spec = get_family(model)
    skip = (f"{spec.lm_head}.weight",) if model.config.tie_word_embeddings else ()
    seed = Seed(str(loaded.source), model.config.to_dict(), loaded.path, StateDictSource(model.state_dict(), skip))
    seed._loaded = loaded
    return seed


def _config_get(config: dict, spec: FamilySpec, key: str) -> Any:
    return config.get(spec.config_keys[key])


def check_seeds(seeds: list[Seed]) -> FamilySpec:
    """All seeds: one family, plain layers, equal shapes and vocabulary, the same tokenizer. Returns the family."""
    first = seeds[0]
    spec = first.spec
    for idx, kind in enumerate(layer_kinds(first.config)):
        if not kind.plain:
            raise BadInputError(f"seed '{first.source}' layer {idx} is already '{kind.describe()}'; "
                                "upcycle dense models")
    for seed in seeds[1:]:
        if seed.spec.family != spec.family:
            raise BadInputError(f"seeds must share a family: '{first.source}' is {spec.family}, "
                                f"'{seed.source}' is {seed.spec.family}")
        for key in (*_SHAPE_KEYS, "vocab"):
            mine = first.config.get("vocab_size") if key == "vocab" else _config_get(first.config, spec, key)
            theirs = seed.config.get("vocab_size") if key == "vocab" else _config_get(seed.config, spec, key)
            if mine != theirs:
                raise BadInputError(f"seeds must share a shape: {key} is {mine} in '{first.source}' "
                                    f"but {theirs} in '{seed.source}'")
    fingerprints = {seed.tokenizer_fingerprint() for seed in seeds} if len(seeds) > 1 else set()
    if len(fingerprints) > 1:
        raise BadInputError("seeds must share a tokenizer; their tokenizer files differ")
    return spec


def expert_plan(n_seeds: int, experts: int | None, top_k: int | None, *, to: str) -> tuple[int, int]:
    """(experts, top_k) after defaults: experts = number of seeds (required with one seed), top_k = 2 (1 with
    one expert); top_k must not exceed experts."""
    if experts is None:
        if n_seeds == 1:
            raise BadInputError(f"--to {to} with a single seed needs --experts N (or more seeds with --from)")
        experts = n_seeds
    if experts < 1:
        raise BadInputError(f"--experts must be at least 1, got {experts}")
    if top_k is None:
        top_k = 1 if experts == 1 else 2
    if not 1 <= top_k <= experts:
        raise BadInputError(f"--top-k {top_k} must be between 1 and the number of experts ({experts})")
    return experts, top_k


def parse_sources(value: str | list | tuple | None) -> list:
    """``--from B,C`` → ['B', 'C']; lists pass through."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return list(value)
