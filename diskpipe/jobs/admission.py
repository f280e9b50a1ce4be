"""Admitting a delivery of an import job: create its record, start a new
attempt of a killed one, or take over one whose worker died."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from diskpipe.jobs.errors import Transient
from diskpipe.jobs.records import RecordStore, new_record
from diskpipe.jobs.states import KILLED, QUEUED, SAVING, IllegalTransition

if TYPE_CHECKING:
    from diskpipe.jobs.pipeline import ImportJob


def ensure_record(
    records: RecordStore, job: ImportJob, attempt: str, lease_gone: Callable[[], bool] | None = None
) -> dict[str, Any]:
    """Create the queued record, or start a new attempt of a killed one.

    A redelivery of the attempt that killed the record (same `attempt` id)
    does not start another; active and queued records are left as they are
    (idempotent by image id), and so is a saving record, unless `lease_gone()`
    says no delivery holds its lease: its worker died or failed, and this
    attempt takes it over (the record's `task_id` becomes `attempt`).
    """
    for _ in range(5):
        record = records.get(job.image_id)
        if record is None:
            fresh = new_record(
                job.image_id, name=job.name, source=job.source, claimed_format=job.claimed_format, task_id=attempt
            )
            if records.create(fresh):
                return fresh
            continue
        if record["status"] == KILLED and record.get("task_id") != attempt:
            restarted = _move(
                records,
                job,
                attempt,
                (KILLED, QUEUED),
                reason=None,
                outcome=None,
                retry=None,
                sealed_checksums=None,  # a killed attempt's values describe no stored image
            )
            if restarted is None:
                continue
            records.request_cancel(job.image_id, False)  # an old cancel must not stop the new attempt
            return restarted
        if record["status"] == SAVING and record.get("task_id") != attempt and lease_gone is not None and lease_gone():
            reason = f"taken over from {record.get('task_id')}, whose lease was gone"
            taken = _move(records, job, attempt, (SAVING, SAVING), reason=reason)
            if taken is None:
                continue
            return taken
        return record
    raise Transient(f"image {job.image_id}: record keeps changing")


def _move(
    records: RecordStore, job: ImportJob, attempt: str, move: tuple[str, str], **changes: Any
) -> dict[str, Any] | None:
    """The record moved to this attempt; None when another delivery moved it first."""
    try:
        return records.transition(
            job.image_id,
            *move,
            task_id=attempt,
            source=job.source,
            claimed_format=job.claimed_format,
            **changes,
        )
    except IllegalTransition:
        return None
