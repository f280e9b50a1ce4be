"""A job's progress, written to its record at most twice a second, and the
cancel check that rides on it when no heartbeat thread does."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from diskpipe.converter.qemu_img import CancelToken
from diskpipe.jobs.records import RecordStore

log = logging.getLogger(__name__)
PROGRESS_EVERY = 0.5  # seconds between progress writes


class ProgressWriter:
    """Callable as `progress(stage, percent, done_bytes=None)`."""

    def __init__(
        self,
        records: RecordStore,
        image_id: str,
        cancel: CancelToken,
        *,
        checks_cancel: bool,
        lease_lost: Callable[[], bool] | None = None,
        time_limit_errors: tuple[type[Exception], ...] = (),
    ) -> None:
        self._lease_lost = lease_lost or (lambda: False)
        self._time_limit_errors = time_limit_errors
        self._records = records
        self._image_id = image_id
        self._cancel = cancel
        self._checks_cancel = checks_cancel  # no heartbeat thread: look for a cancel here
        self._last_write = 0.0

    def check_cancel(self) -> None:
        # A lost lease stops the work too: another delivery has the job now.
        if self._lease_lost() or self._records.cancel_requested(self._image_id):
            self._cancel.cancel()

    def __call__(self, stage: str, percent: float, done: int | None = None) -> None:
        if self._lease_lost():
            return  # the record is another delivery's now
        now = time.monotonic()
        if now - self._last_write < PROGRESS_EVERY and percent < 100:
            return
        self._last_write = now
        try:
            self._records.set_progress(
                self._image_id, {"stage": stage, "percent": round(percent, 2), "bytes": done, "at": time.time()}
            )
            if self._checks_cancel:
                self.check_cancel()
        except Exception as error:  # progress is best effort (Redis may be restarting)
            if isinstance(error, self._time_limit_errors):
                # The caller's time limit landed during the write: the job is
                # out of time, the record store is not away.
                raise
            log.warning("progress of %s not recorded: %s", self._image_id, error)
