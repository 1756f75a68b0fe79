"""Offline text for the reference model: the Python standard library's own sources.

Every machine where seqtool installs has these files, so training and evaluation need no download.
The split is by top-level module name (a hash), so held-out text never shares a package with training text.
Numbers depend on the Python version's stdlib; the model card records the version used.
"""
from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# Packages that are mostly data, generated tables or test fixtures: poor language-model text.
_SKIP_TOP = {"test", "site-packages", "dist-packages", "lib2to3", "idlelib", "turtledemo", "ensurepip",
             "pydoc_data", "encodings", "__pycache__", "tkinter", "config-3.11-x86_64-linux-gnu"}
_HELDOUT_MOD = 8  # one module in eight is held out
_FILE_SEP = "\n\n"
_MAX_FILE_CHARS = 200_000


@dataclass(frozen=True)
class CorpusInfo:
    """Where the text came from: reported in the model card."""

    stdlib: str
    python: str
    n_train_files: int
    n_heldout_files: int
    train_chars: int
    heldout_chars: int


def stdlib_dir() -> Path:
    """The directory holding the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(module: str) -> str:
    """``"heldout"`` or ``"train"`` for a top-level module name (stable across machines)."""
    h = int(hashlib.sha1(module.encode()).hexdigest()[:8], 16)
    return "heldout" if h % _HELDOUT_MOD == 0 else "train"


def _top_module(rel: Path) -> str:
    return rel.parts[0].removesuffix(".py")


def list_files(split: str, root: Path | None = None) -> list[Path]:
    """Sorted stdlib ``.py`` files of one split (``"train"`` or ``"heldout"``)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    root = root or stdlib_dir()
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(part in _SKIP_TOP or part.startswith("test") for part in rel.parts[:-1]) or rel.parts[0] in _SKIP_TOP:
            continue
        if rel.name.startswith("test_"):
            continue
        if split_of(_top_module(rel)) == split:
            out.append(p)
    return out


def _read(p: Path) -> str:
    try:
        text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""
    return text[:_MAX_FILE_CHARS]


@lru_cache(maxsize=4)
def load_text(split: str, max_chars: int | None = None) -> str:
    """Concatenated source text of one split, files in sorted order, cut at ``max_chars``."""
    parts: list[str] = []
    total = 0
    for p in list_files(split):
        t = _read(p).strip()
        if not t:
            continue
        parts.append(t)
        total += len(t) + len(_FILE_SEP)
        if max_chars is not None and total >= max_chars:
            break
    text = _FILE_SEP.join(parts)
    return text if max_chars is None else text[:max_chars]


def corpus_info() -> CorpusInfo:
    """Sizes of both splits for the model card."""
    tr, ho = list_files("train"), list_files("heldout")
    return CorpusInfo(stdlib=str(stdlib_dir()), python=sys.version.split()[0], n_train_files=len(tr),
                      n_heldout_files=len(ho), train_chars=len(load_text("train")),
                      heldout_chars=len(load_text("heldout")))
