"""The tasks: thin wrappers that hand `diskpipe.jobs` a worker's environment
and turn the image's record into the task's state."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from diskpipe.tasks import worker
from diskpipe.tasks.errors import ImportFailed, raise_for_outcome

log = logging.getLogger(__name__)


class RecordedRetryTask(Task):  # type: ignore[misc]  # Celery carries no types
    """Celery's autoretry, with each wait written into the image's record
    (status stays `saving`): "retrying in 40 s: Ceph did not answer"."""

    def retry(
        self, *args: Any, exc: BaseException | None = None, countdown: float | None = None, **options: Any
    ) -> Any:
        image_id = (self.request.kwargs or {}).get("image_id")
        if image_id and exc is not None and self.request.retries < (self.max_retries or 0):
            attempt, attempts = self.request.retries + 2, (self.max_retries or 0) + 1
            wait = f"in {countdown:.0f} s" if countdown is not None else "soon"
            log.warning("image %s: %s; retrying %s (attempt %d of %d)", image_id, exc, wait, attempt, attempts)
            try:
                worker.environment(self.app).records.update(
                    image_id, reason=f"retrying {wait}: {exc}", retry={"attempt": attempt, "of": attempts}
                )
            except Exception as error:  # noqa: BLE001 - Redis may be the thing that is down
                log.warning("image %s: retry not recorded: %s", image_id, error)
        return super().retry(*args, exc=exc, countdown=countdown, **options)


def import_image(
    self: Any,
    image_id: str,
    source: str,
    claimed_format: str | None = None,
    name: str | None = None,
    to_format: str = "raw",
    full_hashes: bool = True,
    sparse_hash: bool = False,
) -> dict[str, Any]:
    """Import one image. SUCCESS with the record when it becomes active;
    ImageRefused / ImportFailed / ImportCancelled (carrying the record)
    otherwise. Idempotent by image id."""
    from diskpipe.jobs.pipeline import ImportJob, run_import

    job = ImportJob(image_id, source, claimed_format, name, to_format, full_hashes, sparse_hash)
    environment = worker.environment(self.app)
    final = self.request.retries >= self.max_retries
    try:
        record = run_import(
            job,
            environment,
            attempt=self.request.id or image_id,
            final_attempt=final,
            retries_done=self.request.retries,
        )
    except SoftTimeLimitExceeded:
        # run_import ends its own record on a time limit; one that escapes it
        # hit while this delivery held no record of its own (waiting for
        # another delivery's lease): that record is not this task's to kill.
        current = environment.records.get(image_id)
        if current is None:
            raise ImportFailed(f"image {image_id}: time limit exceeded", {"id": image_id}) from None
        record = current
    return raise_for_outcome(record)


def delete_image(self: Any, image_id: str) -> dict[str, Any]:
    """Delete an image: {"record": …} or {"error": …, "code": "protected|in-use|not-found"}."""
    from diskpipe.jobs.errors import JobRefused
    from diskpipe.jobs.management import delete_image as delete

    try:
        return {"record": delete(image_id, worker.environment(self.app))}
    except KeyError:
        return {"error": f"no image {image_id}", "code": "not-found"}
    except JobRefused as error:
        return {"error": str(error), "code": "refused"}


def protect_image(self: Any, image_id: str, protected: bool = True) -> dict[str, Any]:
    """Protect an image (or lift it) in its record and the workers' store:
    {"record": …} or {"error": …, "code": "not-found"}."""
    from diskpipe.jobs.management import set_protected

    try:
        return {"record": set_protected(image_id, worker.environment(self.app), protected)}
    except KeyError:
        return {"error": f"no image {image_id}", "code": "not-found"}


def cancel_image(self: Any, image_id: str) -> dict[str, Any]:
    """Ask a job to stop; returns the record as it is now."""
    from diskpipe.jobs.management import cancel_image as cancel

    try:
        return cancel(image_id, worker.environment(self.app).records)
    except KeyError:
        return {"error": f"no image {image_id}"}


def cleanup(self: Any) -> dict[str, Any]:
    """Remove temporaries whose owner is gone, and old staged files."""
    return worker.cleanup(self.app)


def register(app: Any) -> None:
    """Register the tasks on `app` under their stable names."""
    import redis

    from diskpipe.jobs.errors import Transient

    settings = app.settings
    retrying = {
        "base": RecordedRetryTask,
        "autoretry_for": (Transient, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError),
        "max_retries": settings.max_retries,
        "retry_backoff": settings.retry_backoff,
        "retry_backoff_max": settings.retry_backoff_max,
        "retry_jitter": settings.retry_jitter,
    }
    app.task(name="diskpipe.import_image", bind=True, shared=False, **retrying)(import_image)
    app.task(name="diskpipe.delete_image", bind=True, shared=False, **retrying)(delete_image)
    app.task(name="diskpipe.protect_image", bind=True, shared=False, **retrying)(protect_image)
    app.task(name="diskpipe.cancel_image", bind=True, shared=False)(cancel_image)
    app.task(name="diskpipe.cleanup", bind=True, shared=False)(cleanup)
