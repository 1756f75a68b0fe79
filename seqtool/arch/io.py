"""Checkpoint I/O: load a model from a directory / preset / cached hub id, save it atomically with its recipe.

Layout of a saved checkpoint: safetensors weights (sharded above ``max_shard_size``), ``config.json`` with the
recipe under key ``"seqtool"``, generation config, tokenizer files, and a generated model card (``README.md``).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from seqtool import recipe as recipe_mod
from seqtool.arch.registry import get_family
from seqtool.errors import BadInputError, DeviceError, OutputExistsError, SeqtoolError, UnsupportedModelError
from seqtool.zoo import presets

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
BACKUP_SUFFIX = ".seqtool-backup"
TMP_PREFIX = ".seqtool-tmp-"
# Files copied from the source checkpoint when the tokenizer object does not write them itself.
_EXTRA_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer.model", "special_tokens_map.json")


@dataclass
class LoadedModel:
    """A model with its tokenizer and where it came from."""

    model: PreTrainedModel
    tokenizer: Any
    source: str
    path: Path | None = None
    recipe: list[dict] = field(default_factory=list)

    @property
    def family(self) -> str:
        return get_family(self.model).family


def resolve_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``auto`` → None (decided per source); ``fp32|bf16|fp16`` → torch dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return None
    if name not in DTYPES:
        raise BadInputError(f"unknown dtype '{name}'; use one of auto, fp32, bf16, fp16")
    return DTYPES[name]


def resolve_device(name: str | None) -> torch.device:
    """``auto`` → cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda was requested but no CUDA GPU is available; use --device cpu")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise BadInputError(f"unknown device '{name}'; use auto, cpu or cuda")


def recover_interrupted_swap(path: Path) -> None:
    """Finish or undo an ``--in-place``/``--force`` swap that was killed half-way.

    The swap renames ``path`` → ``path.seqtool-backup``, then the new directory → ``path``, then deletes the
    backup. If ``path`` is missing the swap stopped between the renames: restore the backup. If both exist the
    new checkpoint is in place: drop the backup.
    """
    backup = path.with_name(path.name + BACKUP_SUFFIX)
    if not backup.exists():
        return
    if path.exists():
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(backup, path)


def resolve_source(source: str) -> Path | str:
    """A checkpoint directory, or the preset name itself for random-weight presets."""
    if presets.is_preset(source):
        if source == "ref":
            if not (presets.REF_DIR / "config.json").exists():
                raise SeqtoolError("the reference model is not trained yet; run `seqtool zoo train-ref`")
            return presets.REF_DIR
        return source
    path = Path(source).expanduser()
    recover_interrupted_swap(path)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise BadInputError(f"'{source}' is not a Hugging Face checkpoint directory (no config.json)")
        return path
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return _resolve_hub_cache(source)
    raise BadInputError(
        f"'{source}' is neither a local checkpoint directory nor a preset; presets: {', '.join(presets.preset_names())}"
    )


def _resolve_hub_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        raise BadInputError(
            f"'{repo_id}' is not in the local Hugging Face cache and seqtool works offline; "
            "download it elsewhere and pass its local directory"
        ) from None


def _check_loadable(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    if config.get("quantization_config"):
        raise UnsupportedModelError(f"'{path}' is a quantized checkpoint; seqtool needs unquantized weights")
    get_family(config)  # unsupported families (incl. remote-code ones) fail here with the supported list
    has_safetensors = any(path.glob("*.safetensors"))
    if not has_safetensors and any(path.glob("*.bin")):
        raise UnsupportedModelError(
            f"'{path}' only has pickle (.bin) weights; seqtool loads safetensors only (convert it with transformers)"
        )
    return config


def checkpoint_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(name, torch.float32)


def _auto_dtype(config: dict, device: torch.device) -> torch.dtype:
    """The checkpoint's dtype; on CPU half precision is upcast to fp32 (CPU half matmuls are slow)."""
    return torch.float32 if device.type == "cpu" else checkpoint_dtype(config)


def load_model(source: str, *, dtype: str | torch.dtype | None = "auto", device: str | None = "auto",
               device_map: str | dict | None = None, attn: str | None = None, meta: bool = False,
               apply_recipe: bool = True) -> LoadedModel:
    """Load a causal LM from a local directory, a preset or a cached hub id.

    ``meta=True`` builds the model on the meta device (shapes only, nothing allocated). ``attn`` is an attention
    implementation (``sdpa``/``eager``) or a seqtool patch spec (``block_topk:budget=0.25``). Runtime patches
    recorded in the checkpoint's recipe are re-applied unless ``apply_recipe=False``.
    """
    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device if device_map is None else "auto")
    resolved = resolve_source(source)
    if isinstance(resolved, str):
        model, tokenizer = presets.build_preset(resolved, dtype=torch_dtype, device=target, meta=meta)
        loaded = LoadedModel(model, tokenizer, source)
    else:
        config = _check_loadable(resolved)
        from seqtool.models import register  # seqtool's own classes (hybrid mixers) become Auto*-loadable

        register()
        torch_dtype = torch_dtype or (checkpoint_dtype(config) if meta else _auto_dtype(config, target))
        if meta:
            hf_config = AutoConfig.from_pretrained(resolved, local_files_only=True, trust_remote_code=False)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                resolved, dtype=torch_dtype, local_files_only=True, trust_remote_code=False, use_safetensors=True,
                device_map=device_map if device_map is not None else target,
            )
        model.eval()
        tokenizer = _load_tokenizer(resolved)
        loaded = LoadedModel(model, tokenizer, source, path=resolved, recipe=recipe_mod.read(model.config))
    if attn in ("sdpa", "eager"):
        model.set_attn_implementation(attn)
    if apply_recipe and loaded.recipe and not meta:
        recipe_mod.reapply_runtime_steps(model, loaded.recipe)
    if attn and attn not in ("sdpa", "eager"):
        from seqtool.patches import apply_attn_spec

        apply_attn_spec(model, attn)
    return loaded


def _load_tokenizer(path: Path):
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception:
        # A checkpoint without tokenizer files still works for profiling; fall back to bytes.
        tokenizer = presets.byte_level_tokenizer()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def prepare_output(out_dir: str | Path, *, force: bool = False, in_place: bool = False,
                   source_dir: Path | None = None) -> Path:
    """Check that ``out_dir`` may be written; returns it as a resolved Path."""
    out = Path(out_dir).expanduser().resolve()
    recover_interrupted_swap(out)
    same_as_input = source_dir is not None and out == Path(source_dir).resolve()
    if same_as_input and not in_place:
        raise OutputExistsError(f"output '{out}' is the input checkpoint; pass --in-place to overwrite it")
    if out.exists() and not (force or in_place):
        raise OutputExistsError(f"output '{out}' exists; pass --force to replace it or choose another -o")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output '{out}' exists and is not a directory")
    return out


def save_model(model: PreTrainedModel, tokenizer: Any, out_dir: str | Path, *, step: dict | None = None,
               force: bool = False, in_place: bool = False, source_dir: Path | None = None,
               max_shard_size: str = "2GB", card_extra: str = "") -> Path:
    """Write ``model`` atomically to ``out_dir`` and append ``step`` to its recipe.

    The checkpoint is written to a temp directory beside ``out_dir``, validated (every weight present, no
    NaN/inf, reloads), then renamed into place; an existing ``out_dir`` (``force``/``in_place``) is swapped out
    through a backup so a kill at any moment leaves a loadable checkpoint.
    """
    out = prepare_output(out_dir, force=force, in_place=in_place, source_dir=source_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{TMP_PREFIX}{out.name}-{uuid.uuid4().hex[:8]}"
    try:
        steps = recipe_mod.read(model.config)
        if step is not None:
            steps = [*steps, recipe_mod.make_step(step)]
        recipe_mod.write(model.config, steps)
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _copy_extra_files(source_dir, tmp)
        (tmp / "README.md").write_text(recipe_mod.model_card(model, steps, extra=card_extra))
        validate_checkpoint(tmp, model)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _copy_extra_files(source_dir: Path | None, tmp: Path) -> None:
    if source_dir is None:
        return
    for name in _EXTRA_FILES:
        src = Path(source_dir) / name
        if src.exists() and not (tmp / name).exists():
            shutil.copy2(src, tmp / name)


def _swap_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    backup = out.with_name(out.name + BACKUP_SUFFIX)
    shutil.rmtree(backup, ignore_errors=True)
    os.replace(out, backup)
    os.replace(tmp, out)
    shutil.rmtree(backup, ignore_errors=True)


def validate_checkpoint(path: Path, model: PreTrainedModel | None = None, *, full_reload_max_params: int = 200_000_000) -> None:
    """Every expected weight present with the right shape, no NaN/inf, and (for small models) a full reload."""
    from safetensors import safe_open

    stored: dict[str, tuple[int, ...]] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise SeqtoolError(f"refusing to write a checkpoint with NaN/inf in '{key}'")
                stored[key] = tuple(tensor.shape)
    if model is not None:
        tied = set(getattr(model, "_tied_weights_keys", None) or {})
        if model.config.tie_word_embeddings:
            tied |= {"lm_head.weight"}
        for key, param in model.state_dict().items():
            if key in stored:
                if stored[key] != tuple(param.shape):
                    raise SeqtoolError(f"written weight '{key}' has shape {stored[key]}, expected {tuple(param.shape)}")
            elif key not in tied:
                raise SeqtoolError(f"written checkpoint is missing weight '{key}'")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    n_params = sum(math.prod(s) for s in stored.values())
    if n_params <= full_reload_max_params:
        AutoModelForCausalLM.from_pretrained(path, config=config, local_files_only=True, dtype="auto")


def weights_fingerprint(model) -> str:
    """12 hex chars that change when the weights change (names + the first 4096 values of every tensor);
    benchmark caches use it to drop rows measured on other weights."""
    import hashlib

    h = hashlib.sha1()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().flatten()[:4096].cpu().numpy().tobytes())
    return h.hexdigest()[:12]
