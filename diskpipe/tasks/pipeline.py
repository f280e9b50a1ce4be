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

from diskpipe.converter.checksums import Checksums, hash_image
from diskpipe.converter.convert import ConversionFailed, ConvertRequest, ConvertResult, Refused, convert_image
from diskpipe.converter.qemu_img import Cancelled, CancelToken
from diskpipe.converter.stores.base import (
    ImageInUse,
    ImageNotFound,
    Store,
    StoreError,
    StoreUnavailable,
    check_image_id,
)
from diskpipe.formats import FormatError
from diskpipe.formats.api import inspect_reader
from diskpipe.formats.policy import Policy
from diskpipe.tasks import sources
from diskpipe.tasks.records import RecordStore, new_record
from diskpipe.tasks.states import ACTIVE, DELETED, FINAL, KILLED, QUEUED, SAVING, IllegalTransition, StaleAttempt
from diskpipe.validation import UnsafeImage

log = logging.getLogger(__name__)
PROGRESS_EVERY = 0.5  # seconds between progress writes


class Transient(Exception):
    """Worth retrying later (Ceph, Redis or the network were unavailable)."""


class JobRefused(Exception):
    """A refusal by a management command (protected, in use...)."""


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
    owner: str = field(default_factory=lambda: f"{os.uname().nodename}-{os.getpid()}")
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
            try:
                restarted = records.transition(
                    job.image_id,
                    KILLED,
                    QUEUED,
                    task_id=attempt,
                    source=job.source,
                    claimed_format=job.claimed_format,
                    reason=None,
                    sealed_checksums=None,  # a killed attempt's values describe no stored image
                )
            except IllegalTransition:
                continue
            records.request_cancel(job.image_id, False)  # an old cancel must not stop the new attempt
            return restarted
        if record["status"] == SAVING and record.get("task_id") != attempt and lease_gone is not None and lease_gone():
            try:
                return records.transition(
                    job.image_id,
                    SAVING,
                    SAVING,
                    task_id=attempt,
                    source=job.source,
                    claimed_format=job.claimed_format,
                    reason=f"taken over from {record.get('task_id')}, whose lease was gone",
                )
            except IllegalTransition:
                continue
        return record
    raise Transient(f"image {job.image_id}: record keeps changing")


def _record_fields(result: ConvertResult) -> dict[str, Any]:
    fields = result.to_json()
    fields.pop("status", None)
    fields.pop("id", None)
    fields["sealed_checksums"] = None  # recorded now under Glance's keys
    return fields


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


def _sealed_fields(checksums: Checksums) -> dict[str, Any]:
    """What a delivery records before renaming the sealed image (see _adopt_stored)."""
    return {"size": checksums.size, "md5": checksums.md5, "sha512": checksums.sha512, "sparse": checksums.sparse}


def _stale(error: StaleAttempt) -> None:
    log.warning("%s: this delivery lost its lease and writes nothing more", error)


def _kill(
    records: RecordStore, image_id: str, reason: str, expected: str = SAVING, fence: int | None = None
) -> dict[str, Any]:
    try:
        return records.transition(image_id, expected, KILLED, fence=fence, reason=reason)
    except IllegalTransition as error:
        if isinstance(error, StaleAttempt):
            _stale(error)
        record = records.get(image_id)
        assert record is not None
        return record


def run_import(job: ImportJob, env: Environment, attempt: str, *, final_attempt: bool = True) -> dict[str, Any]:
    """Run one delivery of an import job; returns the record at the end.

    Raises Transient when a retry may succeed and this is not the final
    attempt (the record stays `saving` for the next delivery to take over).
    Any other error, expected or not, at any step ends the record `killed`
    with a reason naming the step; only when even that cannot be recorded
    does the error escape (no lease then keeps the record: resubmitting the
    id takes it over).
    """
    records = env.records
    step = JobStep()
    lease = env.lease(job.image_id) if env.lease is not None else None
    try:
        lease_gone = (lambda: not lease.held_by_anyone()) if lease is not None else None
        record = ensure_record(records, job, attempt, lease_gone)
        if record["status"] in FINAL:
            return record
        if lease is not None:
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
    except Exception as error:
        if isinstance(error, (Transient, *env.retry_errors)):
            raise
        # No lease held: end the record only if this attempt made it.
        return _end_after_error(env, job.image_id, step, error, attempt=attempt)
    try:
        return _run_with_lease(job, env, attempt, lease, final_attempt, step)
    except StaleAttempt as error:
        _stale(error)
        current = records.get(job.image_id)
        assert current is not None
        return current
    except Exception as error:
        if isinstance(error, (Transient, *env.retry_errors)):
            raise
        return _end_after_error(env, job.image_id, step, error)  # still under the lease
    finally:
        if lease is not None:
            lease.release()


def _end_after_error(
    env: Environment, image_id: str, step: JobStep, error: Exception, attempt: str | None = None
) -> dict[str, Any]:
    """Kill the record after an error no step handled (a bug, a time limit).

    With `attempt` (no lease held: another delivery may own the record), only
    a queued record of that attempt is ended; a saving one stays for the
    delivery that holds its lease, or for a resubmission to take over. An
    image already stored is removed: a killed record keeps no data.
    """
    if isinstance(error, env.time_limit_errors):
        reason = f"time limit exceeded during {step.name}"
    else:
        log.error("image %s: unexpected error during %s", image_id, step.name, exc_info=error)
        reason = f"internal error during {step.name}: {type(error).__name__}: {error}"
    try:
        record = env.records.get(image_id)
        if record is None or record["status"] in FINAL:
            if record is None:
                raise error
            return record
        if attempt is not None and (record["status"] != QUEUED or record.get("task_id") != attempt):
            raise error
        if step.attempt is not None and record.get("attempts") != step.attempt:
            return record  # taken over: the stored image, if any, is the new attempt's
        if step.stored:
            _delete_quietly(env.store, image_id)
        return env.records.transition(image_id, record["status"], KILLED, fence=step.attempt, reason=reason)
    except Exception as failure:  # noqa: BLE001 - the original error is raised again
        if failure is not error:
            log.error("image %s: could not record the failure: %s", image_id, failure)
        raise error from None


def _run_with_lease(
    job: ImportJob, env: Environment, attempt: str, lease: LeaseLike | None, final_attempt: bool, step: JobStep
) -> dict[str, Any]:
    records, store = env.records, env.store
    step.name = "record"
    record = records.get(job.image_id)
    assert record is not None
    if record["status"] in FINAL:
        return record
    if records.cancel_requested(job.image_id):
        records.request_cancel(job.image_id, False)
        return _kill(records, job.image_id, "cancelled before it started", expected=record["status"])
    record = records.transition(
        job.image_id,
        record["status"],
        SAVING,
        attempts=int(record.get("attempts") or 0) + 1,
        task_id=attempt,
        owner=env.owner,
        reason=None,
    )
    step.attempt = fence = record["attempts"]
    cancel = CancelToken()
    last_write = [0.0]

    def lease_lost() -> bool:
        return lease is not None and lease.lost.is_set()

    def check_cancel() -> None:
        # A lost lease stops the work too: another delivery has the job now.
        if lease_lost() or records.cancel_requested(job.image_id):
            cancel.cancel()

    def progress(stage: str, percent: float, done: int | None = None) -> None:
        if lease_lost():
            return
        now = time.monotonic()
        if now - last_write[0] < PROGRESS_EVERY and percent < 100:
            return
        last_write[0] = now
        try:
            records.set_progress(
                job.image_id, {"stage": stage, "percent": round(percent, 2), "bytes": done, "at": time.time()}
            )
            if lease is None:
                check_cancel()  # no heartbeat thread: look for a cancel here
        except Exception as error:  # noqa: BLE001 - progress is best effort (Redis may be restarting)
            log.warning("progress of %s not recorded: %s", job.image_id, error)

    if lease is not None:
        lease.start_heartbeat(on_tick=check_cancel)

    retryable: tuple[type[Exception], ...] = (StoreUnavailable, sources.SourceUnavailable, Transient, *env.retry_errors)
    staged: sources.Staged | None = None
    unpacked: sources.Staged | None = None
    try:
        started = time.monotonic()
        step.name = "purge"
        _purge_temporaries(store, job.image_id)
        log.info("image %s: leftovers purged in %.1f s", job.image_id, time.monotonic() - started)
        if store.exists(job.image_id):
            # A previous delivery stored the image but died before recording it.
            step.name = "adopt"
            return _adopt_stored(job, env, record, fence)
        step.name = "fetch"
        staged = _fetch(job, env, progress, cancel)
        cancel.raise_if_cancelled()
        step.name = "unpack"
        unpacked, info = sources.unpack(
            staged, env.import_config, label=job.image_id, max_virtual_size=env.policy.max_virtual_size
        )
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
            on_sealed=lambda sums: records.update(job.image_id, sealed_checksums=_sealed_fields(sums)),
        )
        step.name, step.stored = "verify", True
        progress("verify", 0.0)
        try:
            verify(store, result)
        except ConversionFailed:
            _delete_quietly(store, job.image_id)
            raise
        if lease is not None and lease.lost.is_set():
            raise Transient("lost the lease while working")
        step.name = "record"
        fields = _record_fields(result)
        if unpacked.unpacked:
            fields["unpacked"] = unpacked.unpacked
        if staged.stream_notes:
            fields["notes"] = [*staged.stream_notes, *fields.get("notes", [])]
        progress("done", 100.0)
        return records.transition(job.image_id, SAVING, ACTIVE, fence=fence, **fields)
    except (Refused, UnsafeImage) as refusal:
        reason = "; ".join(f"{issue.check}: {issue.message}" for issue in refusal.issues)
        return _kill(records, job.image_id, f"refused: {reason}", fence=fence)
    except FormatError as error:
        return _kill(records, job.image_id, f"refused: malformed: {error}", fence=fence)
    except sources.SourceRefused as error:
        return _kill(records, job.image_id, f"refused: {error}", fence=fence)
    except (Cancelled, InterruptedError):
        if not lease_lost():  # the cancel was asked for, not caused by the lost lease
            records.request_cancel(job.image_id, False)
        return _kill(records, job.image_id, "cancelled", fence=fence)
    except ConversionFailed as error:
        return _kill(records, job.image_id, f"conversion failed: {error}", fence=fence)
    except retryable as error:
        if final_attempt:
            return _kill(records, job.image_id, f"gave up after retries: {error}", fence=fence)
        raise Transient(str(error)) from error
    except StoreError as error:
        return _kill(records, job.image_id, f"store refused: {error}", fence=fence)
    except (KeyboardInterrupt, SystemExit):
        _kill(records, job.image_id, "interrupted", fence=fence)
        raise
    finally:
        for item in (unpacked, staged):
            if item is not None:
                item.close()


def _fetch(job: ImportJob, env: Environment, progress: Callable[..., None], cancel: CancelToken) -> sources.Staged:
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


def _purge_temporaries(store: Store, image_id: str) -> None:
    """With the lease held, every temporary of the image (`<id>.tmp.*`, an
    unfinished upload) is a dead delivery's leftover."""
    store.purge_temporaries(image_id)


def _adopt_stored(job: ImportJob, env: Environment, record: dict[str, Any], fence: int) -> dict[str, Any]:
    """Record an image a dead delivery finalized.

    Before renaming, that delivery recorded the checksums it read from the
    sealed image (`sealed_checksums`); the lease kept any other delivery from
    storing under this id since, and a killed attempt's values are cleared
    when a new one starts. So the stored image is the one those values were
    read from: its format and size are checked (a few small reads) and its
    data is hashed again only when a value the job asks for is missing."""
    image = env.store.open_image(job.image_id)
    try:
        size = image.stored_size()
        stored = inspect_reader(image.read_at, size)
        if stored.format != "raw" and job.to_format == "raw":
            raise ConversionFailed("stored image is not raw")
        sums = _recorded_checksums(record, size, job)
        if sums is None:
            sums = hash_image(size, list(image.extents()), image.read_at, full=job.full_hashes, sparse=job.sparse_hash)
    finally:
        image.close()
    location = env.store.location(job.image_id)
    fields: dict[str, Any] = {
        "disk_format": job.to_format,
        "container_format": "bare",
        "virtual_size": stored.virtual_size,
        "locations": [{"url": location.url, "metadata": location.metadata}],
        "sealed_checksums": None,
        **sums.glance_properties(include_sparse=job.sparse_hash),
    }
    return env.records.transition(job.image_id, SAVING, ACTIVE, fence=fence, **fields)


def _recorded_checksums(record: dict[str, Any], size: int, job: ImportJob) -> Checksums | None:
    """The sealed image's checksums as its delivery recorded them, if they
    are complete for `job` and of an image of `size` bytes."""
    sealed = record.get("sealed_checksums")
    if not isinstance(sealed, dict) or sealed.get("size") != size:
        return None
    sums = Checksums(size=size, md5=sealed.get("md5"), sha512=sealed.get("sha512"), sparse=sealed.get("sparse"))
    if job.full_hashes and (sums.md5 is None or sums.sha512 is None):
        return None
    if job.sparse_hash and sums.sparse is None:
        return None
    return sums


def _delete_quietly(store: Store, image_id: str) -> None:
    try:
        store.delete(image_id)
    except StoreError as error:
        log.warning("could not remove unverified image %s: %s", image_id, error)


# -- management ---------------------------------------------------------------


def delete_image(image_id: str, env: Environment) -> dict[str, Any]:
    """Delete a stored image: refused while protected or while it has clones."""
    records = env.records
    record = records.get(image_id)
    if record is None:
        raise KeyError(image_id)
    if record.get("protected"):
        raise JobRefused(f"image {image_id} is protected; unprotect it first")
    if record["status"] == SAVING:
        raise JobRefused(f"image {image_id} is being saved; cancel it first")
    if record["status"] == DELETED:
        return record
    try:
        env.store.delete(image_id)
    except ImageNotFound:
        pass
    except ImageInUse as error:
        raise JobRefused(str(error)) from error
    except StoreUnavailable as error:
        raise Transient(str(error)) from error
    return records.transition(image_id, record["status"], DELETED, locations=[])


def set_protected(image_id: str, records: RecordStore, protected: bool) -> dict[str, Any]:
    if records.get(image_id) is None:
        raise KeyError(image_id)
    return records.update(image_id, protected=protected)


def cancel_image(image_id: str, records: RecordStore) -> dict[str, Any]:
    """Ask the job to stop. A queued job is killed at once; a saving one stops
    at its next heartbeat (its worker kills qemu-img and removes the
    temporary image)."""
    record = records.get(image_id)
    if record is None:
        raise KeyError(image_id)
    if record["status"] in FINAL:
        return record
    records.request_cancel(image_id)
    if record["status"] == QUEUED:
        try:
            killed = records.transition(image_id, QUEUED, KILLED, reason="cancelled")
            records.request_cancel(image_id, False)
            return killed
        except IllegalTransition:
            pass
    current = records.get(image_id)
    assert current is not None
    return current
