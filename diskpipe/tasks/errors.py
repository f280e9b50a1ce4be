"""How an import task ends when its image does not become `active`.

A task's state tells the truth (Flower, `AsyncResult.state`): `active` is
SUCCESS with the record as the result; every other end is a FAILURE whose
exception names the outcome and carries the record. Importable without
Celery, so a client can catch them.
"""

from __future__ import annotations

from typing import Any


class JobEnded(Exception):
    """The job ended without an active image; `.record` is its record."""

    def __init__(self, message: str, record: dict[str, Any] | None = None) -> None:
        super().__init__(message, record)
        self.record = record or {}

    def __str__(self) -> str:
        return str(self.args[0])


class ImageRefused(JobEnded):
    """The image (or its source) was refused: unsafe, malformed, not allowed."""


class ImportFailed(JobEnded):
    """The infrastructure failed (store, Ceph, Redis, network) and retries did not help."""


class ImportCancelled(JobEnded):
    """The job was cancelled (`diskpipe cancel`)."""


OUTCOME_ERRORS: dict[str, type[JobEnded]] = {
    "refused": ImageRefused,
    "failed": ImportFailed,
    "cancelled": ImportCancelled,
}


def raise_for_outcome(record: dict[str, Any]) -> dict[str, Any]:
    """The record of an image that became active; the typed error for one
    that ended otherwise. A record still queued or saving belongs to another
    delivery of the same image (this one deferred to its lease): returned."""
    if record.get("status") != "killed":
        return record
    error = OUTCOME_ERRORS.get(str(record.get("outcome")), ImportFailed)
    raise error(f"image {record.get('id')}: {record.get('reason') or record.get('status')}", record)
