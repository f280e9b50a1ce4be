"""One import job, start to end, as plain functions: the Celery task and the
embedded (in-process) `diskpipe import` run exactly this code.

fetch/receive -> inspect -> validate -> convert -> store -> verify -> record

The record moves queued -> saving -> active | killed through the record
store; a lease (with a heartbeat) keeps two deliveries of one job from ever
working side by side; everything temporary is removed on the way out.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from diskpipe.converter.convert import ConversionFailed, ConvertRequest, ConvertResult, convert_image
from diskpipe.converter.qemu_img import Cancelled, CancelToken
from diskpipe.converter.stores.base import Store, check_image_id, owner_tag
from diskpipe.formats.policy import Policy
from diskpipe.jobs import sources
from diskpipe.jobs.admission import ensure_record
from diskpipe.jobs.endings import (
    end_after_error,
    given_up,
    kill,
    outcome_of,
    remove_if_still_ours,
    stale,
    transient_errors,
)
from diskpipe.jobs.errors import Transient
from diskpipe.jobs.records import RecordStore
from diskpipe.jobs.reporting import ProgressWriter
from diskpipe.jobs.sealed import adopt_stored, record_fields, sealed_fields
from diskpipe.jobs.states import ACTIVE, CANCELLED, FAILED, FINAL, KILLED, OUTCOME_ACTIVE, SAVING, StaleAttempt

log = logging.getLogger(__name__)


class LeaseLike(Protocol):
    lost: Any

    def acquire(self, *, give_up: Callable[[], bool], poll: float = 1.0, timeout: float | None = None) -> bool: ...

    def start_heartbeat(self, on_tick: Callable[[], None] | None = None, interval: float | None = None) -> None: ...

    def release(self) -> None: ...

    def held_by_anyone(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class ImportJob:
    image_id: str
    source: str  # a local path or an http(s) URL
    claimed_format: str | None = None
    name: str | None = None
    to_format: str = "raw"
    full_hashes: bool = True
    sparse_hash: bool = False

    def __post_init__(self) -> None:
        check_image_id(self.image_id)  # before any record, file or RBD image is named after it

    def to_json(self) -> dict[str, Any]:
        return {
            "image_id": self.image_id,
            "source": self.source,
            "claimed_format": self.claimed_format,
            "name": self.name,
            "to_format": self.to_format,
            "full_hashes": self.full_hashes,
            "sparse_hash": self.sparse_hash,
        }


@dataclass
class Environment:
    records: RecordStore
    store: Store
    policy: Policy = field(default_factory=Policy)
    import_config: sources.ImportConfig = field(default_factory=sources.ImportConfig)
    lease: Callable[[str], LeaseLike] | None = None  # None: one process, no lease needed
    lease_wait: float | None = None  # how long a second delivery waits for a live lease
    trust_local_paths: bool = False  # the embedded CLI imports any file its user can read
    owner: str = field(default_factory=owner_tag)  # the lease holder's name: host, namespace key, pid
    # Infrastructure errors the caller retries (Celery: Redis unreachable),
    # handled like Transient; any other unexpected error kills the record.
    retry_errors: tuple[type[Exception], ...] = ()
    # The caller's "out of time" errors (Celery's soft time limit).
    time_limit_errors: tuple[type[Exception], ...] = ()


@dataclass
class JobStep:
    """Where a job is, so an unexpected error can say which step failed."""

    name: str = "record"
    stored: bool = False  # the image is in the store under its final name
    # This delivery's attempt number once it holds the lease: its fencing
    # token, so a delivery that lost the lease cannot change the record.
    attempt: int | None = None


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(source: str) -> bool:
    """A scheme and `://` at the start make a URL (refused unless its scheme
    is allowed); `./http://x` or `/dir/nbd://x` is a file with an odd name."""
    return _URL.match(source) is not None


def verify(store: Store, result: ConvertResult) -> None:
    """The stored image must be the one the conversion sealed and hashed:
    it exists at its location (on RBD: the protected snapshot) with the size
    that was hashed. No data is read again: the checksums were computed from
    the sealed image after sealing (on RBD from the snapshot itself, which no
    client can change), and the re-inspection checked its format and size."""
    image = store.open_image(result.image_id)
    try:
        size = image.stored_size()
    finally:
        image.close()
    if size != result.checksums.size:
        raise ConversionFailed(f"stored image does not verify: {size} bytes stored, {result.checksums.size} hashed")


def run_import(
    job: ImportJob, env: Environment, attempt: str, *, final_attempt: bool = True, retries_done: int = 0
) -> dict[str, Any]:
    """Run one delivery of an import job; returns the record at the end.

    Raises Transient when a retry may succeed and this is not the final
    attempt (the record stays `saving` for the next delivery to take over).
    Any other error, expected or not, at any step ends the record `killed`
    with a reason naming the step; only when even that cannot be recorded
    does the error escape (no lease then keeps the record: resubmitting the
    id takes it over).
    """
    step = JobStep()
    lease = env.lease(job.image_id) if env.lease is not None else None
    try:
        record = _admit(job, env, attempt, lease, step)
        if record is not None:
            return record
    except Exception as error:
        if isinstance(error, (Transient, *env.retry_errors)):
            raise
        # No lease held: end the record only if this attempt made it.
        return end_after_error(env, job.image_id, step, error, attempt=attempt)
    try:
        return _run_with_lease(job, env, Delivery(attempt, lease, final_attempt, retries_done), step)
    except StaleAttempt as error:
        stale(error)
        current = env.records.get(job.image_id)
        assert current is not None
        return current
    except Exception as error:
        if isinstance(error, (Transient, *env.retry_errors)):
            raise
        return end_after_error(env, job.image_id, step, error)  # still under the lease
    finally:
        if lease is not None:
            lease.release()


@dataclass(frozen=True, slots=True)
class Delivery:
    """This delivery of a job: its attempt id, its lease, where it stands in
    the caller's retries."""

    attempt: str
    lease: LeaseLike | None
    final_attempt: bool
    retries_done: int


def _admit(
    job: ImportJob, env: Environment, attempt: str, lease: LeaseLike | None, step: JobStep
) -> dict[str, Any] | None:
    """Make the record and take the lease; a record to return at once when
    this delivery has nothing to do (the job ended, or another delivery ran it)."""
    records = env.records
    lease_gone = (lambda: not lease.held_by_anyone()) if lease is not None else None
    record = ensure_record(records, job, attempt, lease_gone)
    if record["status"] in FINAL:
        return record
    if lease is None:
        return None
    step.name = "lease"

    def finished() -> bool:
        current = records.get(job.image_id)
        return current is None or current["status"] in FINAL

    waited = time.monotonic()
    if not lease.acquire(give_up=finished, timeout=env.lease_wait):
        current = records.get(job.image_id)
        assert current is not None
        return current
    log.info("image %s: lease taken after %.1f s", job.image_id, time.monotonic() - waited)
    return None


def _start_saving(job: ImportJob, env: Environment, attempt: str, step: JobStep) -> dict[str, Any]:
    """The record goes `saving` for this attempt (or ends: final already, or
    cancelled before it started)."""
    records = env.records
    step.name = "record"
    record = records.get(job.image_id)
    assert record is not None
    if record["status"] in FINAL:
        return record
    if records.cancel_requested(job.image_id):
        records.request_cancel(job.image_id, False)
        return kill(records, job.image_id, CANCELLED, "cancelled before it started", expected=record["status"])
    return records.transition(
        job.image_id,
        record["status"],
        SAVING,
        attempts=int(record.get("attempts") or 0) + 1,
        task_id=attempt,
        owner=env.owner,
        reason=None,
    )


def _run_with_lease(job: ImportJob, env: Environment, delivery: Delivery, step: JobStep) -> dict[str, Any]:
    record = _start_saving(job, env, delivery.attempt, step)
    if record["status"] != SAVING:
        return record
    step.attempt = fence = record["attempts"]
    cancel = CancelToken()
    lease_lost = delivery.lease.lost.is_set if delivery.lease is not None else None
    progress = ProgressWriter(
        env.records,
        job.image_id,
        cancel,
        checks_cancel=delivery.lease is None,
        lease_lost=lease_lost,
        time_limit_errors=env.time_limit_errors,
    )
    if delivery.lease is not None:
        delivery.lease.start_heartbeat(on_tick=progress.check_cancel)
    held: list[sources.Staged] = []
    try:
        return _steps(job, env, record, delivery, step, progress, cancel, held)
    except transient_errors(env) as error:
        if delivery.final_attempt:
            return kill(env.records, job.image_id, FAILED, given_up(error, delivery.retries_done), fence=fence)
        raise Transient(str(error)) from error
    except (Exception, KeyboardInterrupt, SystemExit) as error:
        if lease_lost and lease_lost() and isinstance(error, (Cancelled, InterruptedError)):
            # Stopped because the lease was lost, not asked to: this delivery
            # writes nothing more. Taken over: the record is the new
            # attempt's. Not (yet): a retry finishes the job or finds it done.
            current = env.records.get(job.image_id)
            if current is not None and current.get("attempts") != fence:
                stale(StaleAttempt(job.image_id, KILLED, fence, current.get("attempts")))
                return current
            raise Transient("lost the lease while working") from error
        ending = outcome_of(error)
        if ending is None:
            raise
        if ending[0] == CANCELLED and not (lease_lost and lease_lost()):
            # The cancel was asked for (not caused by the lost lease): it is done.
            env.records.request_cancel(job.image_id, False)
        ended = kill(env.records, job.image_id, *ending, fence=fence)
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        return ended
    finally:
        for item in reversed(held):
            item.close()


def _steps(
    job: ImportJob,
    env: Environment,
    record: dict[str, Any],
    delivery: Delivery,
    step: JobStep,
    progress: ProgressWriter,
    cancel: CancelToken,
    held: list[sources.Staged],
) -> dict[str, Any]:
    """purge -> (adopt) -> fetch -> unpack -> convert -> verify -> record."""
    store, records = env.store, env.records
    started = time.monotonic()
    step.name = "purge"
    # With the lease held, every temporary of the image is a dead delivery's leftover.
    store.purge_temporaries(job.image_id)
    log.info("image %s: leftovers purged in %.1f s", job.image_id, time.monotonic() - started)
    if store.exists(job.image_id):
        # A previous delivery stored the image but died before recording it.
        step.name = "adopt"
        assert step.attempt is not None
        adopted = adopt_stored(job, env, record, step.attempt)
        if adopted is not None:
            return adopted
    step.name = "fetch"
    staged = _fetch(job, env, progress, cancel)
    held.append(staged)
    cancel.raise_if_cancelled()
    step.name = "unpack"
    unpacked, info = sources.unpack(
        staged, env.import_config, label=job.image_id, max_virtual_size=env.policy.max_virtual_size
    )
    held.append(unpacked)
    step.name = "convert"
    # The descriptor that was inspected is the one converted: nothing reopens the path.
    request = ConvertRequest(
        source=unpacked.description,
        source_fd=unpacked.fd,
        image_id=job.image_id,
        to_format=job.to_format,
        claimed=job.claimed_format,
        policy=env.policy,
        full_hashes=job.full_hashes,
        sparse_hash=job.sparse_hash,
    )
    result = convert_image(
        request,
        store,
        progress=progress,
        cancel=cancel,
        inspected=info,
        # Fenced: a delivery taken over while it converted must not leave its
        # checksums for the next one to adopt (StaleAttempt: the converter
        # removes its own temporary and the stored image stays the successor's).
        on_sealed=lambda sums: records.update(job.image_id, fence=step.attempt, sealed_checksums=sealed_fields(sums)),
    )
    step.name, step.stored = "verify", True
    progress("verify", 0.0)
    try:
        verify(store, result)
    except ConversionFailed:
        remove_if_still_ours(env, job.image_id, step.attempt, delivery.lease)
        raise
    if delivery.lease is not None and delivery.lease.lost.is_set():
        raise Transient("lost the lease while working")
    step.name = "record"
    fields = record_fields(result)
    if unpacked.unpacked:
        fields["unpacked"] = unpacked.unpacked
    if staged.stream_notes:
        fields["notes"] = [*staged.stream_notes, *fields.get("notes", [])]
    progress("done", 100.0)
    return records.transition(
        job.image_id, SAVING, ACTIVE, fence=step.attempt, outcome=OUTCOME_ACTIVE, reason=None, retry=None, **fields
    )


def _fetch(job: ImportJob, env: Environment, progress: ProgressWriter, cancel: CancelToken) -> sources.Staged:
    progress("fetch", 0.0)
    if is_url(job.source):
        return sources.download(
            job.source,
            env.import_config,
            claimed=job.claimed_format,
            policy=env.policy,
            label=job.image_id,
            cancelled=lambda: cancel.cancelled,
            progress=lambda done, total: progress("fetch", 100.0 * done / total if total else 0.0, done),
        )
    if env.trust_local_paths:
        # The operator's own path (embedded import): no import directory to escape.
        config = replace(env.import_config, allowed_dirs=("/",), allow_hard_links=True)
        return sources.open_local(os.path.abspath(job.source), config)
    return sources.open_local(job.source, env.import_config)
