"""Training progress: a rich bar on a terminal (tokens/s, loss, ETA), a status line every ~30 s off it."""
from __future__ import annotations

import sys
import time


def _eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class TrainProgress:
    """``mode``: ``bar`` | ``lines`` | ``off`` | ``auto`` (bar on a terminal, lines otherwise)."""

    def __init__(self, total: int, start: int = 0, mode: str = "auto", every_s: float = 30.0, label: str = "train"):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode, self.total, self.start, self.every_s, self.label = mode, total, start, every_s, label
        self.t0 = self.last_line = time.perf_counter()
        self._bar = None
        if mode == "bar":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(label, total=total, completed=start, info="")

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        info = f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif self.mode == "lines":
            now = time.perf_counter()
            if now - self.last_line >= self.every_s or step == self.total:
                done = step - self.start
                eta = (now - self.t0) / max(done, 1) * (self.total - step)
                print(f"{self.label}: step {step}/{self.total}  {info}  ETA {_eta(eta)}", file=sys.stderr, flush=True)
                self.last_line = now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
