"""Models bigger than memory: ``--device-map auto --max-memory cpu=8GB`` through accelerate.

:func:`parse_size` / :func:`parse_max_memory` read the CLI's sizes (``8MB``, ``2GiB``, ``cpu=8MB,cuda:0=20GB``).
:func:`load_kwargs` turns them into ``from_pretrained`` arguments: accelerate places each decoder layer on the
first device with room, in the order of ``max_memory``, and what fits nowhere goes to ``"disk"`` (weights read
from the checkpoint's safetensors files, or written to a temp offload folder removed when the model is freed).
:func:`offloading` makes a setting the default of every :func:`seqtool.arch.io.load_model` call inside it, so a
command passes it to the library without threading it through every signature.
:func:`module_weights` gives code that reads a module's weights outside its forward (prune's calibration hooks)
the real tensors of an offloaded module.
"""
from __future__ import annotations

import re
import shutil
import tempfile
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Iterator

from seqtool.errors import BadInputError

DEVICE_MAPS = ("auto",)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_DEVICE = re.compile(r"^(cpu|disk|mps|cuda(:[0-9]+)?|[0-9]+)$")


def parse_size(text: str | int, what: str = "size") -> int:
    """``"8MB"`` → 8_000_000, ``"2GiB"`` → 2·2³⁰, ``"512"`` → 512 bytes; a bad or non-positive size is a
    one-line BadInputError naming ``what``."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE.match(str(text))
        unit = match.group(2).upper() if match else ""
        if not match or (unit and unit not in _UNITS and unit + "B" not in _UNITS):
            raise BadInputError(f"malformed {what} '{text}'; use a byte count with a unit, e.g. 8MB, 512MiB, 2GB")
        unit = unit if unit in _UNITS else unit + "B"
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise BadInputError(f"{what} must be positive, got '{text}'")
    return value


def parse_max_memory(text: str | dict | None) -> dict[str | int, int] | None:
    """``"cpu=8MB,cuda:0=20GB"`` → ``{"cpu": 8_000_000, 0: 20_000_000_000}`` (accelerate's keys: GPU indices
    as ints). None/empty → None."""
    if text is None or text == "" or text == {}:
        return None
    items = text.items() if isinstance(text, dict) else [_split_item(part) for part in str(text).split(",")]
    out: dict[str | int, int] = {}
    for device, size in items:
        device = str(device).strip().lower()
        if not _DEVICE.match(device) or device == "disk":
            raise BadInputError(f"unknown device '{device}' in --max-memory; use cpu, cuda:N or N "
                                "(what fits nowhere goes to disk)")
        key: str | int = int(device.split(":")[1]) if device.startswith("cuda:") else (
            0 if device == "cuda" else int(device) if device.isdigit() else device)
        if key in out:
            raise BadInputError(f"device '{device}' is given twice in --max-memory")
        out[key] = parse_size(size, f"--max-memory size for {device}")
    return out


def _split_item(part: str) -> tuple[str, str]:
    if part.count("=") != 1 or not all(s.strip() for s in part.split("=")):
        raise BadInputError(f"malformed --max-memory item '{part.strip()}'; use DEVICE=SIZE[,DEVICE=SIZE], "
                            "e.g. cpu=8GB")
    device, size = part.split("=")
    return device, size


@dataclass
class Offload:
    """A device map request: ``device_map`` (``auto``) and per-device byte budgets (None: accelerate's default,
    most of each device's free memory)."""

    device_map: str = "auto"
    max_memory: dict[str | int, int] | None = None
    _dirs: list[str] = field(default_factory=list)


def make_offload(device_map: str | None, max_memory: str | dict | None) -> Offload | None:
    """Validate the CLI pair; None when neither is given. ``--max-memory`` alone implies ``--device-map auto``."""
    if device_map is None and not max_memory:
        return None
    device_map = device_map or "auto"
    if device_map not in DEVICE_MAPS:
        raise BadInputError(f"unknown --device-map '{device_map}'; use auto (with --max-memory DEVICE=SIZE,...)")
    return Offload(device_map, parse_max_memory(max_memory))


_active: list[Offload] = []
# The active setting is also exported to subprocesses (profile's per-length workers) through this variable.
ENV_VAR = "SEQTOOL_OFFLOAD"


@contextmanager
def offloading(setting: Offload | None) -> Iterator[Offload | None]:
    """Within the block, :func:`seqtool.arch.io.load_model` calls without their own ``device_map`` use
    ``setting`` (None: a no-op). Offload folders made inside are removed at the end."""
    if setting is None:
        yield None
        return
    import json
    import os

    _active.append(setting)
    previous = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = json.dumps({"device_map": setting.device_map,
                                      "max_memory": {str(k): v for k, v in (setting.max_memory or {}).items()}})
    try:
        yield setting
    finally:
        _active.remove(setting)
        if previous is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = previous
        for path in setting._dirs:
            shutil.rmtree(path, ignore_errors=True)
        setting._dirs.clear()


def active() -> Offload | None:
    """The setting of the innermost :func:`offloading` block, or of the parent process's (``SEQTOOL_OFFLOAD``)."""
    if _active:
        return _active[-1]
    import json
    import os

    exported = os.environ.get(ENV_VAR)
    if not exported:
        return None
    values = json.loads(exported)
    setting = Offload(values["device_map"], parse_max_memory(values["max_memory"]))
    _active.append(setting)  # one setting (and one offload folder list) per process
    return setting


def load_kwargs(setting: Offload) -> tuple[dict, str]:
    """``from_pretrained`` keyword arguments for ``setting`` and the offload folder they use (a new temp dir)."""
    import logging

    # accelerate warns "Some parameters are on the meta device because they were offloaded" on every such load;
    # seqtool reports the placement itself (load_model's notice)
    logging.getLogger("accelerate.big_modeling").setLevel(logging.ERROR)
    folder = tempfile.mkdtemp(prefix="seqtool-offload-")
    setting._dirs.append(folder)
    kwargs: dict = {"device_map": setting.device_map, "offload_folder": folder}
    if setting.max_memory:
        kwargs["max_memory"] = dict(setting.max_memory)
    return kwargs, folder


def attach_folder(model, folder: str) -> None:
    """Remove ``folder`` when ``model`` is garbage-collected (or at exit)."""
    weakref.finalize(model, shutil.rmtree, folder, True)


def is_offloaded(model) -> bool:
    """Whether some of ``model``'s weights live off the execution device (accelerate hooks load them per call)."""
    placement = getattr(model, "hf_device_map", None) or {}
    return any(str(v) in ("disk", "meta") for v in placement.values()) or any(
        getattr(getattr(m, "_hf_hook", None), "offload", False) for m in model.modules())


def placement_summary(model) -> dict[str, int]:
    """Number of device-map entries per device (``{"cpu": 3, "disk": 14}``); empty when not dispatched."""
    counts: dict[str, int] = {}
    for device in (getattr(model, "hf_device_map", None) or {}).values():
        counts[str(device)] = counts.get(str(device), 0) + 1
    return counts


def module_weights(module):
    """Context in which ``module``'s own parameters are real tensors even if accelerate offloaded them (they are
    loaded from the offload store and put back at exit); a no-op for a module that is not offloaded."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None or not getattr(hook, "offload", False):
        return nullcontext()
    from accelerate.utils import align_module_device

    return align_module_device(module, getattr(hook, "execution_device", None))


def require_not_offloaded(model, what: str) -> None:
    """One-line error for operations that rewrite or train weights in place, which offloaded weights cannot do."""
    if is_offloaded(model):
        raise BadInputError(f"{what} cannot run on a model offloaded with --device-map/--max-memory (its weights "
                            "are rewritten in place); drop those options, or use the streamed rewrite (--stream)")


def input_device(model):
    """Where ``model``'s inputs go: its accelerate execution device when dispatched with a device map (its
    parameters may then sit on the meta device, offloaded), else the device of its first parameter."""
    import torch

    hook = getattr(model, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is None and getattr(model, "hf_device_map", None):
        real = [d for d in model.hf_device_map.values() if str(d) not in ("disk", "meta")]
        device = real[0] if real else "cpu"
    if device is not None:
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return next(model.parameters()).device
