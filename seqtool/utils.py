"""Small parsing and formatting helpers shared by the CLI and the library."""
from __future__ import annotations

import re
import sys

from seqtool.errors import BadInputError

_NOTICES = {"quiet": False}


def set_notices_quiet(quiet: bool) -> None:
    """``seqtool --quiet`` silences library notices too."""
    _NOTICES["quiet"] = quiet


def notice(message: str) -> None:
    """One line on stderr from the library (e.g. a stale temp directory removed); silenced by ``--quiet``."""
    if not _NOTICES["quiet"]:
        print(message, file=sys.stderr, flush=True)

_LENGTH = re.compile(r"^\s*(\d+)\s*([kKmM]?)\s*$")


def parse_length(text: str | int) -> int:
    """``"32k"`` → 32768 (k = 1024, m = 1024²); plain integers pass through. Must be positive."""
    if isinstance(text, int):
        value = text
    else:
        match = _LENGTH.match(str(text))
        if not match:
            raise BadInputError(f"malformed length '{text}'; use an integer or a k/m suffix such as 2048, 2k or 32k")
        value = int(match.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[match.group(2).lower()]
    if value <= 0:
        raise BadInputError(f"length must be positive, got '{text}'")
    return value


def parse_length_list(text: str) -> list[int]:
    """``"1k,4k,16k"`` → [1024, 4096, 16384]."""
    parts = [p for p in str(text).split(",") if p.strip()]
    if not parts:
        raise BadInputError("empty length list; use e.g. 1k,4k,16k")
    return [parse_length(p) for p in parts]


def parse_int_list(text: str | None) -> list[int]:
    """``"0,1,5"`` → [0, 1, 5]; None or "" → []."""
    if not text:
        return []
    try:
        return [int(p) for p in str(text).split(",") if p.strip()]
    except ValueError:
        raise BadInputError(f"malformed integer list '{text}'; use e.g. 0,1,5") from None


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def format_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))
