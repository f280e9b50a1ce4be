"""Progress display: a bar on a terminal, plain lines otherwise (logs, CI,
and a terminal that reports no width)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

FINISHED_STAGE = "done"  # the pipeline's last report: the stage before it ended


def terminal_columns(stream: TextIO) -> int:
    """The width a bar may use: COLUMNS when set, else the terminal's; 0
    when neither says (a pty set to `stty cols 0`, COLUMNS=0)."""
    variable = os.environ.get("COLUMNS", "").strip()
    if variable:
        try:
            return max(0, int(variable))
        except ValueError:
            pass
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


class ProgressDisplay:
    """Shows (stage, percent) updates; a new stage starts a new bar, and
    the stage before it is shown ended, at 100 %."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        # tqdm cannot draw in no columns: such a terminal gets plain lines.
        self.interactive = enabled and self.stream.isatty() and terminal_columns(self.stream) > 0
        self._stage: str | None = None
        self._bar: Any = None
        self._last_line = 0.0
        self._last_percent = -1.0

    def update(self, stage: str, percent: float) -> None:
        if not self.enabled:
            return
        if stage == FINISHED_STAGE:
            self._end_stage(completed=True)
            return
        percent = max(0.0, min(100.0, percent))
        if stage != self._stage:
            self._end_stage(completed=True)
            self._start_stage(stage)
        self._show(percent)

    def _start_stage(self, stage: str) -> None:
        self._stage = stage
        self._last_percent = -1.0
        if self.interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=100.0, desc=f"{stage:<9}", unit="%", file=self.stream, leave=True,
                             bar_format="{desc} {bar} {n:5.1f}% [{elapsed}<{remaining}]")  # fmt: skip

    def _show(self, percent: float) -> None:
        if self._bar is not None:
            self._bar.update(percent - self._bar.n)
            return
        now = time.monotonic()
        # Plain lines: one for each stage's start and end, between them at most one a second.
        starting = self._last_percent < 0
        if percent != self._last_percent and (starting or now - self._last_line >= 1.0 or percent >= 100.0):
            print(f"{self._stage}: {percent:.1f}%", file=self.stream, flush=True)
            self._last_line = now
            self._last_percent = percent

    def _end_stage(self, *, completed: bool) -> None:
        """Close the current stage; `completed`: it ended, so it shows 100 %."""
        if self._stage is not None and completed:
            self._show(100.0)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._stage = None

    def close(self, *, completed: bool = False) -> None:
        """The job is over; `completed`: it succeeded, its last stage ended."""
        if self.enabled:
            self._end_stage(completed=completed)
