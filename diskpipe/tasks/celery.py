"""The Celery app: `celery -A diskpipe.tasks worker` starts a worker.

Task names are stable strings, so another service can submit without
importing diskpipe:

    app.send_task("diskpipe.import_image", kwargs={"image_id": "…", "source": "…",
                  "claimed_format": "qcow2"})

and the result is the image's record (Glance field names). See the README.

Reliability, chosen on purpose:
- acks_late + reject_on_worker_lost: a job is acknowledged only when it
  ends, and a killed worker child hands its job back to the queue;
- prefetch 1: a worker holds only the job it runs, so a dead worker strands
  one job at most;
- visibility timeout: a dead worker's unacknowledged job returns after it;
  the per-image lease keeps a redelivered job from running beside a live one;
- retries with exponential backoff only for transient failures (Ceph, Redis
  or the network unreachable), never for a refused image;
- hard and soft time limits per job.
"""

from __future__ import annotations

import logging
import os
import random
from functools import cache
from typing import Any

from celery import Celery, signals
from celery.exceptions import SoftTimeLimitExceeded

from diskpipe.tasks import kombu_fix
from diskpipe.tasks.settings import CeleryConfig, load_celery_config, redis_client

log = logging.getLogger(__name__)
kombu_fix.install()

config: CeleryConfig = load_celery_config()
BROKER = config.broker_url or "redis://127.0.0.1:6379/0"

app = Celery("diskpipe")
app.conf.update(
    broker_url=BROKER,
    result_backend=config.result_backend or BROKER,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_track_started=True,
    task_time_limit=config.time_limit,
    task_soft_time_limit=config.soft_time_limit,
    task_default_queue=config.queue,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=7 * 24 * 3600,
    result_extended=True,
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,  # keep reconnecting while Redis restarts
    broker_transport_options={
        "visibility_timeout": config.visibility_timeout,
        **(
            {"unacked_restore_interval": config.redelivery_sweep, "unacked_restore_throttle": 1}
            if config.redelivery_sweep
            else {}
        ),
    },
    result_backend_transport_options={"retry_policy": {"timeout": 60.0}},
    # A running job survives a broker reconnect; if its acknowledgement is
    # lost the job is delivered once more and the record makes that a no-op.
    worker_cancel_long_running_tasks_on_connection_loss=False,
    worker_hijack_root_logger=False,
)
if config.concurrency:
    app.conf.worker_concurrency = config.concurrency


@cache
def _redis_for(pid: int) -> Any:
    return redis_client(BROKER)


def worker_redis() -> Any:
    """One Redis client per process (a forked child makes its own)."""
    return _redis_for(os.getpid())


@cache
def _environment_for(pid: int) -> Any:
    import redis

    from diskpipe.formats.policy import load_policy
    from diskpipe.tasks.lease import Lease
    from diskpipe.tasks.pipeline import Environment
    from diskpipe.tasks.records import RedisRecords
    from diskpipe.tasks.settings import load_store_config, make_store
    from diskpipe.tasks.sources import load_import_config

    client = worker_redis()
    owner = f"{os.uname().nodename}-{pid}"
    return Environment(
        records=RedisRecords(client),
        store=make_store(load_store_config()),
        policy=load_policy(),
        import_config=load_import_config(),
        lease=lambda image_id: Lease(client, image_id, owner, ttl=config.lease_ttl),
        lease_wait=config.lease_wait,
        owner=owner,
        # Redis unreachable: retried by the task; a soft time limit ends the record.
        retry_errors=(redis.exceptions.ConnectionError, redis.exceptions.TimeoutError),
        time_limit_errors=(SoftTimeLimitExceeded,),
    )


def worker_environment() -> Any:
    return _environment_for(os.getpid())


def _backoff(retries: int) -> float:
    return float(min(config.retry_backoff_max, 2**retries)) * random.uniform(0.5, 1.0)


def _transient_errors() -> tuple[type[BaseException], ...]:
    import redis

    from diskpipe.tasks.pipeline import Transient

    return (Transient, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


@app.task(name="diskpipe.import_image", bind=True, max_retries=config.max_retries)
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
    """Import one image; returns its record. Idempotent by image id."""
    from diskpipe.tasks.pipeline import ImportJob, run_import

    job = ImportJob(image_id, source, claimed_format, name, to_format, full_hashes, sparse_hash)
    final = self.request.retries >= self.max_retries
    try:
        return run_import(job, worker_environment(), attempt=self.request.id or image_id, final_attempt=final)
    except SoftTimeLimitExceeded:
        # run_import ends its own record on a time limit; one that escapes it
        # hit while this delivery held no record of its own (waiting for
        # another delivery's lease): that record is not this task's to kill.
        record = worker_environment().records.get(image_id)
        return record if record is not None else {"id": image_id, "error": "time limit exceeded"}
    except _transient_errors() as error:
        log.warning("import of %s: transient failure, retry %d: %s", image_id, self.request.retries + 1, error)
        raise self.retry(exc=error, countdown=_backoff(self.request.retries)) from error


@app.task(name="diskpipe.delete_image", bind=True, max_retries=config.max_retries)
def delete_image(self: Any, image_id: str) -> dict[str, Any]:
    """Delete an image: {"record": …} or {"error": …, "code": "protected|in-use|not-found"}."""
    from diskpipe.tasks.pipeline import JobRefused, Transient
    from diskpipe.tasks.pipeline import delete_image as delete

    try:
        return {"record": delete(image_id, worker_environment())}
    except KeyError:
        return {"error": f"no image {image_id}", "code": "not-found"}
    except JobRefused as error:
        return {"error": str(error), "code": "refused"}
    except Transient as error:
        raise self.retry(exc=error, countdown=_backoff(self.request.retries)) from error


@app.task(name="diskpipe.cancel_image")
def cancel_image(image_id: str) -> dict[str, Any]:
    """Ask a job to stop; returns the record as it is now."""
    from diskpipe.tasks.pipeline import cancel_image as cancel

    try:
        return cancel(image_id, worker_environment().records)
    except KeyError:
        return {"error": f"no image {image_id}"}


@app.task(name="diskpipe.cleanup")
def cleanup() -> dict[str, Any]:
    """Remove temporaries whose owner is gone, and old staged files."""
    from diskpipe.tasks.lease import Lease
    from diskpipe.tasks.sources import cleanup_staging

    environment = worker_environment()
    client = worker_redis()

    def is_live(image_id: str, owner: str) -> bool:
        # A temporary is live exactly while some delivery holds the image's lease.
        return bool(client.exists(Lease.PREFIX + image_id))

    return {"store": environment.store.cleanup(is_live), "staging": cleanup_staging(environment.import_config)}


@signals.worker_process_init.connect
def _reset_after_fork(**_: Any) -> None:
    # Sockets and Ceph handles are per process: build them anew in the child.
    _redis_for.cache_clear()
    _environment_for.cache_clear()


@signals.worker_ready.connect
def _cleanup_on_start(**_: Any) -> None:
    try:
        removed = cleanup()
        log.info("startup cleanup: %s", removed)
    except Exception as error:  # noqa: BLE001 - a cleanup failure must not stop the worker
        log.warning("startup cleanup failed: %s", error)
