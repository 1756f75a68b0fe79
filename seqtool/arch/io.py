"""Checkpoint I/O: load a model from a directory / preset / cached hub id, save it atomically with its recipe.

Layout of a saved checkpoint: safetensors weights (sharded above ``max_shard_size``), ``config.json`` with the
recipe under key ``"seqtool"``, generation config, tokenizer files, and a generated model card (``README.md``).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from seqtool import recipe as recipe_mod
from seqtool.arch.paths import (ADAPTER_TMP_PREFIX, BACKUP_SUFFIX, STALE_UNOWNED_S, TMP_PREFIX,  # noqa: F401
                                 _parent_lock, check_loadable, check_output_path, check_weight_files,
                                 check_writable, clean_stale_temps, in_place_target, prepare_output, read_config,
                                 recover_interrupted_swap, resolve_source, temp_name)
from seqtool.arch.registry import get_family
from seqtool.errors import BadInputError, DeviceError, OutputExistsError, SeqtoolError, UnsupportedModelError
from seqtool.utils import notice
from seqtool.zoo import presets

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Weight files an in-place rewrite replaces; every other file of the input is carried over.
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")
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
    source_dtype: torch.dtype | None = None  # the dtype stored on disk (outputs keep it unless asked otherwise)

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


def _tied_keys(model: PreTrainedModel) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    keys = set(tied) if not isinstance(tied, dict) else set(tied)
    if getattr(model.config, "tie_word_embeddings", False):
        keys.add("lm_head.weight")
    return keys


def check_weights_match(path: Path, stored: dict[str, tuple[int, ...]], model: PreTrainedModel, *,
                        allow_missing: bool = False) -> None:
    """Compare the checkpoint's tensors with the model's: missing / unexpected tensors and wrong shapes are
    one-line errors naming them (a missing tensor would otherwise be initialised randomly, silently)."""
    # on disk, transformers may hold tensors under other names than in memory (MoE experts fused in memory, one
    # tensor per expert on disk): compare with whichever layout the checkpoint uses
    in_memory = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    on_disk = _saved_shapes(model)
    expected = on_disk if len(set(on_disk) & set(stored)) > len(set(in_memory) & set(stored)) else in_memory
    wrong = [f"{k} {list(stored[k])} (expected {list(s)})" for k, s in expected.items() if k in stored and stored[k] != s]
    if wrong:
        raise BadInputError(f"'{path}' has tensor(s) of the wrong shape for its config.json: {_names(wrong)}")
    if allow_missing:
        return
    missing = sorted(set(expected) - set(stored) - _tied_keys(model))
    if missing:
        raise BadInputError(f"'{path}' is missing {len(missing)} tensor(s) its config needs: {_names(missing)} "
                            "(they would be random; pass allow_missing=True only if that is intended)")
    ignored = [*(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []), *_IGNORED_UNEXPECTED]
    unexpected = sorted(k for k in set(stored) - set(expected) if not any(re.search(p, k) for p in ignored))
    if unexpected:
        raise BadInputError(f"'{path}' has {len(unexpected)} tensor(s) its config does not use: {_names(unexpected)}")


# Tensors older checkpoints carry that transformers drops on load (rotary caches saved as buffers).
_IGNORED_UNEXPECTED = (r"rotary_emb\.inv_freq$",)


def _names(items: list[str], limit: int = 4) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def checkpoint_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(name, torch.float32)


def _auto_dtype(config: dict, device: torch.device) -> torch.dtype:
    """The checkpoint's dtype; on CPU half precision is upcast to fp32 (CPU half matmuls are slow)."""
    return torch.float32 if device.type == "cpu" else checkpoint_dtype(config)


def load_model(source: str, *, dtype: str | torch.dtype | None = "auto", device: str | None = "auto",
               device_map: str | dict | None = None, attn: str | None = None, meta: bool = False,
               apply_recipe: bool = True, allow_missing: bool = False,
               max_memory: str | dict | None = None) -> LoadedModel:
    """Load a causal LM from a local directory, a preset or a cached hub id.

    ``meta=True`` builds the model on the meta device (shapes only, nothing allocated). ``attn`` is an attention
    implementation (``sdpa``/``eager``) or a seqtool patch spec (``block_topk:budget=0.25``). Runtime patches
    recorded in the checkpoint's recipe are re-applied unless ``apply_recipe=False``. A checkpoint directory is
    checked before any weight is read (:func:`check_weight_files`, :func:`check_weights_match`): missing or
    unexpected tensors are an error unless ``allow_missing=True`` (missing ones are then random).
    ``device_map="auto"`` and/or ``max_memory`` (``"cpu=8GB"`` or a dict) place the layers with accelerate and
    offload what does not fit to disk (:mod:`seqtool.arch.offload`; the default is the enclosing
    :func:`seqtool.arch.offload.offloading` block's setting).
    """
    import seqtool.models  # noqa: F401  (registers seqtool's own model classes with Auto*)
    from seqtool.arch import offload

    offload_setting = None
    if device_map == "auto" or max_memory:
        offload_setting = offload.make_offload(device_map, max_memory)
    elif device_map is None and not meta:
        offload_setting = offload.active()

    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device if device_map is None else "auto")
    resolved = resolve_source(source)
    quiet_hf_progress()
    if offload_setting is not None and not isinstance(resolved, Path):
        raise BadInputError(f"--device-map/--max-memory need a checkpoint directory, not the preset '{source}' "
                            f"(write it with `seqtool zoo save {source} -o DIR`)")
    if isinstance(resolved, str):
        model, tokenizer = presets.build_preset(resolved, dtype=torch_dtype, device=target, meta=meta)
        loaded = LoadedModel(model, tokenizer, source, source_dtype=next(model.parameters()).dtype)
    else:
        config = check_loadable(resolved)
        stored = check_weight_files(resolved)
        torch_dtype = torch_dtype or (checkpoint_dtype(config) if meta else _auto_dtype(config, target))
        try:
            hf_config = AutoConfig.from_pretrained(resolved, local_files_only=True, trust_remote_code=False)
            with torch.device("meta"):
                shapes = AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise BadInputError(f"'{resolved / 'config.json'}' does not describe a model: {_first_line(exc)}") from None
        check_weights_match(resolved, stored, shapes, allow_missing=allow_missing)
        if meta:
            model = shapes
        else:
            del shapes
            placement, folder = {"device_map": device_map if device_map is not None else target}, None
            if offload_setting is not None:
                placement, folder = offload.load_kwargs(offload_setting)
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    resolved, config=hf_config, dtype=torch_dtype, local_files_only=True, trust_remote_code=False,
                    use_safetensors=True, **placement,
                )
            except (OSError, ValueError, RuntimeError) as exc:
                if "out of memory" in str(exc).lower():
                    raise
                raise BadInputError(f"cannot load the weights of '{resolved}': {_first_line(exc)}") from None
            if folder is not None:
                offload.attach_folder(model, folder)
                placed = offload.placement_summary(model)
                notice("device map: " + ", ".join(f"{n} module group(s) on {d}" for d, n in placed.items()))
        model.eval()
        tokenizer = _load_tokenizer(resolved)
        loaded = LoadedModel(model, tokenizer, source, path=resolved, recipe=recipe_mod.read(model.config),
                             source_dtype=checkpoint_dtype(config))
    if attn in ("sdpa", "eager"):
        model.set_attn_implementation(attn)
    if apply_recipe and loaded.recipe and not meta:
        recipe_mod.reapply_runtime_steps(model, loaded.recipe)
    if attn and attn not in ("sdpa", "eager"):
        from seqtool.patches import apply_attn_spec

        apply_attn_spec(model, attn)
    return loaded



def as_loaded(model: Any, tokenizer: Any = None, *, dtype: str = "auto", device: str = "auto",
              verb: str = "use") -> "LoadedModel":
    """A LoadedModel from a source string (loaded without re-applying its recipe), a LoadedModel, or a bare
    transformers model (+ optional tokenizer); anything else is a one-line error naming ``verb``."""
    import torch.nn as nn

    if isinstance(model, (str, Path)):
        return load_model(str(model), dtype=dtype, device=device, apply_recipe=False)
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        get_family(model)
        return LoadedModel(model, tokenizer, getattr(model.config, "_name_or_path", "") or "<in-memory model>")
    raise BadInputError(f"cannot {verb} a {type(model).__name__}; pass a path, preset name or a transformers model")

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


def quiet_hf_progress() -> None:
    """Silence transformers / hub progress bars when stderr is not a terminal (seqtool's own are silent there)."""
    if sys.stderr.isatty():
        return
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()


def save_model(model: PreTrainedModel, tokenizer: Any, out_dir: str | Path, *, step: dict | None = None,
               force: bool = False, in_place: bool = False, source_dir: Path | None = None,
               max_shard_size: str = "2GB", card_extra: str = "", dtype: str | torch.dtype | None = None) -> Path:
    """Write ``model`` atomically to ``out_dir`` and append ``step`` to its recipe.

    The checkpoint is written to a temp directory beside ``out_dir`` (named with this process's pid, so a later
    run can remove it if this one is killed), validated (every weight present, no NaN/inf, reloads), then
    renamed into place under a lock on the parent directory: an output that appeared meanwhile is not replaced
    without ``force``/``in_place`` (OutputExistsError); an existing one is swapped out through a backup so a
    kill at any moment leaves a loadable checkpoint. ``dtype`` is the dtype written (default: the model's);
    files get the user's umask. ``in_place`` carries over the input's files that are not rewritten.
    """
    out = prepare_output(out_dir, force=force, in_place=in_place, source_dir=source_dir)
    _kill_point("prepared")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / temp_name(TMP_PREFIX, out.name)
    save_dtype = resolve_dtype(dtype)
    quiet_hf_progress()
    try:
        steps = recipe_mod.read(model.config)
        if step is not None:
            steps = [*steps, recipe_mod.make_step(step)]
        recipe_mod.write(model.config, steps)
        tmp.mkdir()
        _kill_point("tmp-created")
        _save_weights(model, tmp, max_shard_size, save_dtype)
        _kill_point("weights-written")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _kill_point("tokenizer-written")
        _copy_extra_files(source_dir, tmp)
        if in_place and source_dir is not None:
            _carry_over(Path(source_dir), tmp)
        (tmp / "README.md").write_text(recipe_mod.model_card(model, steps, extra=card_extra))
        apply_umask(tmp)
        _kill_point("files-written")
        validate_checkpoint(tmp, model)
        _kill_point("validated")
        _publish(tmp, out, replace=force or in_place)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# Points of a save where tests/arch/test_save_kill.py SIGKILLs the writer (renamed: a fresh output; the others
# with --in-place, which swaps through a backup).
KILL_POINTS = ("prepared", "tmp-created", "weights-written", "tokenizer-written", "files-written", "validated",
               "locked", "between-renames", "swapped", "renamed")


def _kill_point(name: str) -> None:
    """Test hook: ``SEQTOOL_KILL_AT=<name>`` SIGKILLs this process at that point of a save (kill tests)."""
    if os.environ.get("SEQTOOL_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _save_weights(model: PreTrainedModel, tmp: Path, max_shard_size: str, dtype: torch.dtype | None) -> None:
    """``save_pretrained`` in ``dtype`` (the model itself is not cast: a copy of its state dict is)."""
    current = next(model.parameters()).dtype
    if dtype is None or dtype == current:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        return
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    model.save_pretrained(tmp, state_dict=state, safe_serialization=True, max_shard_size=max_shard_size)
    # transformers records the in-memory parameters' dtype in config.json; record the one written instead
    config_file = tmp / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def apply_umask(root: Path) -> None:
    """Files as every other tool writes them: 0666 / 0777 minus the user's umask (safetensors writes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~mask)


def _carry_over(source_dir: Path, tmp: Path) -> list[str]:
    """``--in-place``: keep the input's files this run does not rewrite (eval results, adapters, notes)."""
    kept = []
    for entry in sorted(source_dir.iterdir()):
        target = tmp / entry.name
        if target.exists() or entry.name.startswith(".") or any(entry.match(p) for p in _WEIGHT_PATTERNS):
            continue
        if entry.is_dir():
            shutil.copytree(entry, target, symlinks=True)
        else:
            shutil.copy2(entry, target)
        kept.append(entry.name)
    if kept:
        notice(f"kept from the input (not rewritten by this run): {', '.join(kept)}")
    return kept


@contextmanager
def atomic_output(out_dir: str | Path, *, force: bool = False, in_place: bool = False,
                  source_dir: Path | None = None, validate=None) -> Iterator[Path]:
    """Yield a temp directory beside ``out_dir`` to write a checkpoint into; on success it is validated
    (``validate(path)``, default :func:`validate_checkpoint`) and swapped into place (like :func:`save_model`);
    on any error it is deleted and ``out_dir`` is untouched."""
    out = prepare_output(out_dir, force=force, in_place=in_place, source_dir=source_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / temp_name(TMP_PREFIX, out.name)
    tmp.mkdir()
    try:
        yield tmp
        apply_umask(tmp)
        (validate or validate_checkpoint)(tmp)
        _publish(tmp, out, replace=force or in_place)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_extra_files(source_dir: Path | None, dest: Path) -> None:
    """Copy chat templates / sentencepiece files the tokenizer object does not write itself."""
    _copy_extra_files(source_dir, dest)


def _copy_extra_files(source_dir: Path | None, tmp: Path) -> None:
    if source_dir is None:
        return
    for name in _EXTRA_FILES:
        src = Path(source_dir) / name
        if src.exists() and not (tmp / name).exists():
            shutil.copy2(src, tmp / name)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename that fails with FileExistsError instead of replacing ``dst`` (renameat2 on Linux; elsewhere the
    parent lock plus an existence check guard it)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import errno

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = getattr(libc, "renameat2", None)
        if renameat2 is not None:
            AT_FDCWD, RENAME_NOREPLACE = -100, 1
            if renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) == 0:
                return
            err = ctypes.get_errno()
            if err == errno.EEXIST:
                raise FileExistsError(err, os.strerror(err), str(dst))
            if err not in (errno.EINVAL, errno.ENOSYS):
                raise OSError(err, os.strerror(err), str(dst))
    if dst.exists():
        raise FileExistsError(str(dst))
    os.rename(src, dst)


def _publish(tmp: Path, out: Path, *, replace: bool) -> None:
    """Move the finished ``tmp`` to ``out`` under the parent lock; never replace an output that appeared while
    this run worked unless ``replace``."""
    with _parent_lock(out):
        _kill_point("locked")
        if not out.exists():
            try:
                _rename_noreplace(tmp, out)
                _kill_point("renamed")
                return
            except FileExistsError:
                pass
        if not replace:
            raise OutputExistsError(f"output '{out}' was created by another run while this one worked; it was "
                                    "not replaced (pass --force to replace it)")
        _swap_into_place(tmp, out)


def _swap_into_place(tmp: Path, out: Path) -> None:
    backup = out.with_name(out.name + BACKUP_SUFFIX)
    shutil.rmtree(backup, ignore_errors=True)
    os.replace(out, backup)
    _kill_point("between-renames")
    os.replace(tmp, out)
    _kill_point("swapped")
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
        for key, shape in _saved_shapes(model).items():
            if key in stored:
                if stored[key] != shape:
                    raise SeqtoolError(f"written weight '{key}' has shape {stored[key]}, expected {shape}")
            elif key not in tied:
                raise SeqtoolError(f"written checkpoint is missing weight '{key}'")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    n_params = sum(math.prod(s) for s in stored.values())
    if n_params <= full_reload_max_params:
        AutoModelForCausalLM.from_pretrained(path, config=config, local_files_only=True, dtype="auto")


def _saved_shapes(model: PreTrainedModel) -> dict[str, tuple[int, ...]]:
    """Names and shapes ``save_pretrained`` writes: the state dict after transformers reverts its load-time
    weight conversions (e.g. MoE experts fused in memory, one tensor per expert on disk). Computed on meta tensors."""
    state = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in model.state_dict().items()}
    try:
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(model, state)
    except ImportError:  # older transformers: no load-time conversions, saved names are the state dict's
        pass
    return {k: tuple(v.shape) for k, v in state.items()}


def weights_fingerprint(model) -> str:
    """12 hex chars that change when the weights change (names + the first 4096 values of every tensor);
    benchmark caches use it to drop rows measured on other weights."""
    import hashlib

    h = hashlib.sha1()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().flatten()[:4096].cpu().numpy().tobytes())
    return h.hexdigest()[:12]
