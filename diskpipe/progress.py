"""Progress display: a bar on a terminal, plain lines otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class ProgressDisplay:
    """Shows (stage, percent) updates; a new stage starts a new bar."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.interactive = enabled and self.stream.isatty()
        self._stage: str | None = None
        self._bar: Any = None
        self._last_line = 0.0
        self._last_percent = -1.0

    def update(self, stage: str, percent: float) -> None:
        if not self.enabled:
            return
        percent = max(0.0, min(100.0, percent))
        if stage != self._stage:
            self._close_bar()
            self._stage = stage
            self._last_percent = -1.0
            if self.interactive:
                from tqdm import tqdm

                self._bar = tqdm(total=100.0, desc=f"{stage:<9}", unit="%", file=self.stream, leave=True,
                                 bar_format="{desc} {bar} {n:5.1f}% [{elapsed}<{remaining}]")  # fmt: skip
        if self._bar is not None:
            self._bar.update(percent - self._bar.n)
            return
        now = time.monotonic()
        # Plain lines: at most one a second, and one for each stage's end.
        if percent != self._last_percent and (now - self._last_line >= 1.0 or percent >= 100.0):
            print(f"{stage}: {percent:.1f}%", file=self.stream, flush=True)
            self._last_line = now
            self._last_percent = percent

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self._close_bar()
