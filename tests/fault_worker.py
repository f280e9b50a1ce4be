"""The Celery app of a test worker: diskpipe's own, with a bug injected at
the import step named in the file `DISKPIPE_TEST_FAULT_FILE` (empty: none).

An unexpected exception cannot be caused for real, so this module wraps the
steps to raise one, in the worker process; everything else is real. Start it
with `celery -A tests.fault_worker worker` from the repository root.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from diskpipe.jobs import pipeline, sources
from diskpipe.jobs.records import RedisRecords
from diskpipe.tasks import app

__all__ = ["app"]


def current_fault() -> str:
    try:
        with open(os.environ["DISKPIPE_TEST_FAULT_FILE"]) as handle:
            return handle.read().strip()
    except FileNotFoundError:
        return ""


def _inject(owner: Any, name: str, step: str) -> None:
    original: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if current_fault() in (step, f"{step}+escape"):
            raise RuntimeError(f"injected bug at {step}")
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


for _owner, _name, _step in (
    (pipeline, "_fetch", "fetch"),
    (sources, "unpack", "unpack"),
    (pipeline, "convert_image", "convert"),
    (pipeline, "verify", "verify"),
):
    _inject(_owner, _name, _step)

_transition = RedisRecords.transition


def _transition_unless_escaping(self: RedisRecords, image_id: str, expected: str, wanted: str, **changes: Any) -> Any:
    # "<step>+escape": even recording the failure fails (Redis refusing
    # writes, say), so the error leaves the job with the record `saving`.
    if wanted == "killed" and current_fault().endswith("+escape"):
        raise OSError("injected: the record cannot be written")
    return _transition(self, image_id, expected, wanted, **changes)


RedisRecords.transition = _transition_unless_escaping  # type: ignore[method-assign]
