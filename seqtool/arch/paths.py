"""Where checkpoints come from and go to, without importing torch: source resolution, output-path safety,
writability, stale temp directories and the lock that serialises renames into one parent directory.

The CLI calls these before any heavy import so that argument errors are reported in well under a second;
:mod:`seqtool.arch.io` uses them again (the library API gets the same checks). Every command that writes a
checkpoint calls :func:`prepare_output` before doing any work.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import time
import uuid
from pathlib import Path

from seqtool.errors import BadInputError, OutputExistsError, SeqtoolError, UnsupportedModelError
from seqtool.utils import notice
from seqtool.zoo import presets

BACKUP_SUFFIX = ".seqtool-backup"
TMP_PREFIX = ".seqtool-tmp-"
ADAPTER_TMP_PREFIX = ".seqtool-adapter-"
# A temp directory whose name carries no owner pid (older seqtool) counts as stale after this long.
STALE_UNOWNED_S = 3600


def recover_interrupted_swap(path: Path) -> None:
    """Finish or undo an ``--in-place``/``--force`` swap that was killed half-way.

    The swap renames ``path`` → ``path.seqtool-backup``, then the new directory → ``path``, then deletes the
    backup. If ``path`` is missing the swap stopped between the renames: restore the backup. If both exist the
    new checkpoint is in place: drop the backup.
    """
    backup = path.with_name(path.name + BACKUP_SUFFIX)
    if not backup.exists():
        return
    # Under the parent's lock: a live swap holds it between its renames and must not be "recovered".
    with _parent_lock(path):
        if not backup.exists():
            return
        if path.exists():
            shutil.rmtree(backup, ignore_errors=True)
            notice(f"removed '{backup}' (the backup of an interrupted swap; '{path}' holds the new checkpoint)")
        else:
            os.replace(backup, path)
            notice(f"restored '{path}' from '{backup}' (a swap was interrupted before the new checkpoint was in place)")


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
    if "/" in source or os.sep in source or source.startswith((".", "~")):
        raise BadInputError(f"no such directory '{source}' (and it is not a preset or a hub id)")
    raise BadInputError(
        f"'{source}' is neither a local checkpoint directory nor a preset; presets: {', '.join(presets.preset_names())}"
    )


def _hub_cache_dir() -> Path:
    """Where huggingface_hub keeps its cache, read from the same variables it reads (without importing it)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _not_cached(repo_id: str) -> BadInputError:
    return BadInputError(
        f"no such directory '{repo_id}', and no hub id '{repo_id}' in the local Hugging Face cache (seqtool works "
        "offline; download it elsewhere and pass its local directory)")


def _resolve_hub_cache(repo_id: str) -> Path:
    import sys

    if "huggingface_hub" not in sys.modules and not (_hub_cache_dir() / f"models--{repo_id.replace('/', '--')}").exists():
        raise _not_cached(repo_id)  # answered without importing huggingface_hub (~0.5 s)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        raise _not_cached(repo_id) from None


def read_config(path: Path) -> dict:
    """``path/config.json`` as a dict; invalid JSON is a one-line error naming the file."""
    file = Path(path) / "config.json"
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise BadInputError(f"'{file}' is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"cannot read '{file}': {exc}") from None
    if not isinstance(config, dict):
        raise BadInputError(f"'{file}' does not hold a JSON object")
    return config


def _safetensors_header(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape from one safetensors file's header, checking it covers the file exactly (no data read)."""
    size = file.stat().st_size
    if size == 0:
        raise BadInputError(f"weights file '{file}' is empty (0 bytes); the checkpoint is incomplete")
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise BadInputError(f"weights file '{file}' is truncated ({size} bytes, not even a header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise BadInputError(f"weights file '{file}' is truncated or corrupted (its header claims {n} bytes, "
                                f"the file has {size})")
        raw = handle.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise BadInputError(f"weights file '{file}' is corrupted (its header is not valid safetensors JSON)") from None
    shapes, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise BadInputError(f"weights file '{file}' is corrupted (bad header entry for '{name}')") from None
        shapes[name], end = shape, max(end, stop)
    if 8 + n + end > size:
        raise BadInputError(f"weights file '{file}' is truncated ({size} bytes; its header describes {8 + n + end})")
    return shapes


def check_weight_files(path: Path) -> dict[str, tuple[int, ...]]:
    """Read every safetensors header of checkpoint ``path`` (cheap: no tensor data) and return name → shape.

    One-line errors (exit 2) for: no weights beside config.json, an empty / truncated / corrupted file, an index
    that names a missing shard. New commands that read a checkpoint get this through :func:`load_model`.
    """
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise BadInputError(f"'{index}' is not a valid safetensors index (invalid JSON or no weight_map)") from None
        missing = sorted({f for f in weight_map.values() if not (path / f).exists()})
        if missing:
            raise BadInputError(f"'{path}' is incomplete: shard(s) {', '.join(missing)} named in {index.name} are missing")
        files = sorted({path / f for f in weight_map.values()})
    if not files:
        raise BadInputError(f"'{path}' has a config.json but no weights (*.safetensors)")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        shapes.update(_safetensors_header(file))
    return shapes


def check_loadable(path: Path) -> dict:
    """config.json readable, not quantized, a supported family, safetensors rather than pickle."""
    from seqtool.arch.registry import get_family

    config = read_config(path)
    if config.get("quantization_config"):
        raise UnsupportedModelError(f"'{path}' is a quantized checkpoint; seqtool needs unquantized weights")
    get_family(config)  # unsupported families (incl. remote-code ones) fail here with the supported list
    has_safetensors = any(path.glob("*.safetensors"))
    if not has_safetensors and any(path.glob("*.bin")):
        raise UnsupportedModelError(
            f"'{path}' only has pickle (.bin) weights; seqtool loads safetensors only (convert it with transformers)"
        )
    return config


def check_source(source: str) -> Path | str:
    """:func:`resolve_source` plus, for a directory, its config.json and every safetensors header (no tensor data
    read, no torch imported): the cheap checks that let a command fail at once on a broken checkpoint."""
    resolved = resolve_source(source)
    if isinstance(resolved, Path):
        check_loadable(resolved)
        check_weight_files(resolved)
    return resolved


def in_place_target(source: str | Path) -> str:
    """The directory ``--in-place`` writes back to; a preset (random or shipped weights) has none."""
    if isinstance(source, str) and presets.is_preset(source):
        raise BadInputError(f"--in-place needs a checkpoint directory; '{source}' is a built-in preset with no place "
                            "to write back to; pass -o DIR instead")
    return str(source)


def check_output_path(out_dir: str | Path, *, source_dir: Path | None = None, in_place: bool = False) -> Path:
    """Refuse outputs whose replacement would destroy something else: an empty path, ``.``, the current
    directory or one of its ancestors, the home directory, a filesystem root, a directory containing the input
    or inside it. ``--force`` does not override these. Returns the resolved path."""
    text = str(out_dir)
    if not text.strip():
        raise BadInputError("the output path is empty; pass -o NEW_DIR")
    out = Path(text).expanduser().resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if out == Path(out.anchor):
        raise BadInputError(f"refusing to write to '{out}', a filesystem root; pass -o NEW_DIR")
    if out == home:
        raise BadInputError(f"refusing to write to '{out}', the home directory; pass -o NEW_DIR")
    if out == cwd or out in cwd.parents:
        raise BadInputError(f"refusing to write to '{text}': it is the current directory or one of its parents "
                            "and would be replaced; pass -o NEW_DIR")
    if source_dir is not None:
        src = Path(source_dir).expanduser().resolve()
        if out in src.parents:
            raise BadInputError(f"refusing to write to '{out}': it contains the input checkpoint '{src}'")
        if src in out.parents:
            raise BadInputError(f"refusing to write to '{out}': it is inside the input checkpoint '{src}'")
    return out


def check_writable(out: Path) -> None:
    """Fail now, not after the work, when ``out`` cannot be created: probe its nearest existing ancestor."""
    probe_dir = Path(out).parent
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise BadInputError(f"cannot write '{out}': '{probe_dir}' is not a directory")
    probe = probe_dir / f".seqtool-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise BadInputError(f"cannot write '{out}': '{probe_dir}' is not writable ({exc.strerror})") from None


def _owner_alive(name: str) -> bool | None:
    """Whether the process that created temp dir ``name`` (``...-p<pid>-<hex>``) lives; None if no pid in it."""
    parts = name.rsplit("-", 2)
    if len(parts) < 3 or not parts[1].startswith("p") or not parts[1][1:].isdigit():
        return None
    try:
        os.kill(int(parts[1][1:]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(parent: Path) -> list[Path]:
    """Remove ``.seqtool-tmp-*`` / ``.seqtool-adapter-*`` directories in ``parent`` left by killed runs (owner
    pid gone, or no owner pid and older than an hour); says so on stderr. Returns what was removed."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    removed = []
    for entry in parent.iterdir():
        if not entry.name.startswith((TMP_PREFIX, ADAPTER_TMP_PREFIX)) or not entry.is_dir():
            continue
        alive = _owner_alive(entry.name)
        if alive is None:
            try:
                alive = time.time() - entry.stat().st_mtime < STALE_UNOWNED_S
            except OSError:
                continue
        if not alive:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
            notice(f"removed stale temporary directory '{entry}' (left by a run that was killed)")
    return removed


def temp_name(prefix: str, out_name: str = "") -> str:
    """A temp directory name that carries its owner's pid, so a later run can tell a stale one."""
    return f"{prefix}{out_name}-p{os.getpid()}-{uuid.uuid4().hex[:8]}"


def prepare_output(out_dir: str | Path, *, force: bool = False, in_place: bool = False,
                   source_dir: Path | None = None, source: str | Path | None = None) -> Path:
    """Check that ``out_dir`` may be written, before any work: a safe path (:func:`check_output_path`), not a
    preset with ``in_place``, not existing without ``force``, writable; removes stale temp dirs beside it.
    Returns it as a resolved Path. Commands that write a checkpoint call this first."""
    if in_place and source is not None:
        in_place_target(source)
    out = check_output_path(out_dir, source_dir=source_dir, in_place=in_place)
    recover_interrupted_swap(out)
    same_as_input = source_dir is not None and out == Path(source_dir).resolve()
    if same_as_input and not in_place:
        raise OutputExistsError(f"output '{out}' is the input checkpoint; pass --in-place to overwrite it")
    if out.exists() and not (force or in_place):
        raise OutputExistsError(f"output '{out}' exists; pass --force to replace it or choose another -o")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output '{out}' exists and is not a directory")
    check_writable(out)
    clean_stale_temps(out.parent)
    return out


@contextlib.contextmanager
def _parent_lock(path: Path):
    """An exclusive flock on ``path``'s parent directory (no lock file left behind); a no-op without fcntl."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux/macOS
        yield
        return
    parent = Path(path).parent
    if not parent.is_dir():
        yield
        return
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
