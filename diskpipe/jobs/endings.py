"""How a job ends when it does not end `active`: the one place that turns
an error into the record's outcome (refused, failed, cancelled) and reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from diskpipe.converter.convert import ConversionFailed
from diskpipe.converter.qemu_img import Cancelled
from diskpipe.converter.stores.base import Store, StoreError, StoreMisconfigured, StoreUnavailable
from diskpipe.formats import FormatError
from diskpipe.jobs import sources
from diskpipe.jobs.errors import Transient
from diskpipe.jobs.records import RecordStore
from diskpipe.jobs.states import (
    CANCELLED,
    FAILED,
    FINAL,
    KILLED,
    QUEUED,
    REFUSED,
    SAVING,
    IllegalTransition,
    StaleAttempt,
)
from diskpipe.refusal import UnsafeImage, describe

if TYPE_CHECKING:
    from diskpipe.jobs.pipeline import Environment, JobStep, LeaseLike

log = logging.getLogger(__name__)


def _refusal_reason(error: BaseException) -> str:
    issues = error.issues if isinstance(error, UnsafeImage) else ()
    return f"refused: {describe(issues)}"


# In order: the first matching type decides. StoreUnavailable is absent on
# purpose (a StoreError that is transient: retried, see transient_errors).
_ENDINGS: tuple[
    tuple[type[BaseException] | tuple[type[BaseException], ...], str, Callable[[BaseException], str]], ...
] = (
    (UnsafeImage, REFUSED, _refusal_reason),
    (FormatError, REFUSED, lambda error: f"refused: malformed: {error}"),
    (sources.SourceRefused, REFUSED, lambda error: f"refused: {error}"),
    ((Cancelled, InterruptedError), CANCELLED, lambda error: "cancelled"),
    # qemu-img could not convert an image the inspector accepted: the image's fault.
    (ConversionFailed, REFUSED, lambda error: f"conversion failed: {error}"),
    # diskpipe.interrupts names the signal (SIGTERM...); a bare Ctrl-C says nothing.
    ((KeyboardInterrupt, SystemExit), CANCELLED, lambda stop: f"interrupted ({stop})" if str(stop) else "interrupted"),
    (StoreMisconfigured, FAILED, lambda error: f"setup error: {error}"),
)


def outcome_of(error: BaseException) -> tuple[str, str] | None:
    """(outcome, reason) for an error a job step may raise; None for an error
    that is transient (retried) or unexpected (a bug: see end_after_error)."""
    for types, outcome, reason in _ENDINGS:
        if isinstance(error, types):
            return outcome, reason(error)
    if isinstance(error, StoreError) and not isinstance(error, StoreUnavailable):
        # The store's answer (exists, in use...), never the image's fault.
        return FAILED, f"store error: {error}"
    return None


def transient_errors(env: Environment) -> tuple[type[BaseException], ...]:
    """Errors a later delivery may not meet: the infrastructure was away."""
    return (StoreUnavailable, sources.SourceUnavailable, Transient, *env.retry_errors)


def given_up(error: BaseException, retries_done: int) -> str:
    if not retries_done:
        return f"unavailable: {error}"
    return f"gave up after {retries_done} {'retry' if retries_done == 1 else 'retries'}: {error}"


def stale(error: StaleAttempt) -> None:
    log.warning("%s: this delivery lost its lease and writes nothing more", error)


def kill(
    records: RecordStore, image_id: str, outcome: str, reason: str, expected: str = SAVING, fence: int | None = None
) -> dict[str, Any]:
    """End the record `killed` with its outcome (refused, failed, cancelled);
    with `fence`, only while the record is still that attempt's."""
    try:
        return records.transition(image_id, expected, KILLED, fence=fence, outcome=outcome, reason=reason, retry=None)
    except IllegalTransition as error:
        if isinstance(error, StaleAttempt):
            stale(error)
        record = records.get(image_id)
        assert record is not None
        return record


def end_after_error(
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
            delete_quietly(env.store, image_id)
        return env.records.transition(
            image_id, record["status"], KILLED, fence=step.attempt, outcome=FAILED, reason=reason, retry=None
        )
    except Exception as failure:  # noqa: BLE001 - the original error is raised again
        if failure is not error:
            log.error("image %s: could not record the failure: %s", image_id, failure)
        raise error from None


def delete_quietly(store: Store, image_id: str) -> None:
    try:
        store.delete(image_id)
    except StoreError as error:
        log.warning("could not remove unverified image %s: %s", image_id, error)


def remove_if_still_ours(env: Environment, image_id: str, attempt: int | None, lease: LeaseLike | None) -> None:
    """Remove the image this delivery stored and will not record (it failed
    verify, or is not what was sealed), unless a successor owns the record:
    its image is under the same name (an empty update is the fenced check;
    StaleAttempt ends this delivery). When the record store does not answer,
    the lease decides: still held, no one can have taken over, and an image
    left behind would be adopted by the retry."""
    try:
        env.records.update(image_id, fence=attempt)
    except StaleAttempt:
        raise
    except Exception:
        if lease is None or not lease.lost.is_set():
            delete_quietly(env.store, image_id)
        raise
    delete_quietly(env.store, image_id)
