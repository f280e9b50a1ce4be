"""What a worker process holds: its Redis client and job environment (one
per process: a forked child builds its own), and the worker's start-up
chores (say which broker it uses, clean up, keep reconnect noise to one line).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import signals

log = logging.getLogger(__name__)
_per_process: dict[tuple[int, int, str], Any] = {}


def _cached(app: Any, what: str, build: Any) -> Any:
    # Keyed by pid: sockets and Ceph handles must not cross a fork.
    key = (id(app), os.getpid(), what)
    if key not in _per_process:
        _per_process[key] = build()
    return _per_process[key]


def redis(app: Any) -> Any:
    """The worker's Redis client (records, leases): the broker's Redis."""
    from diskpipe.jobs.connection import redis_client

    return _cached(app, "redis", lambda: redis_client(app.conf.broker_url))


def environment(app: Any) -> Any:
    """The job environment of this worker process."""
    return _cached(app, "environment", lambda: _build_environment(app))


def _build_environment(app: Any) -> Any:
    import redis as redis_library
    from celery.exceptions import SoftTimeLimitExceeded

    from diskpipe.config import load
    from diskpipe.converter.stores.registry import StoreConfig, make_store
    from diskpipe.formats.policy import load_policy
    from diskpipe.jobs.lease import Lease
    from diskpipe.jobs.pipeline import Environment
    from diskpipe.jobs.records import RedisRecords
    from diskpipe.jobs.sources import ImportConfig

    client = redis(app)
    settings = app.settings
    owner = f"{os.uname().nodename}-{os.getpid()}"
    return Environment(
        records=RedisRecords(client),
        store=make_store(load(StoreConfig)),
        policy=load_policy(),
        import_config=load(ImportConfig),
        lease=lambda image_id: Lease(client, image_id, owner, ttl=settings.lease_ttl),
        lease_wait=settings.lease_wait,
        owner=owner,
        # Redis unreachable: retried by the task; a soft time limit ends the record.
        retry_errors=(redis_library.exceptions.ConnectionError, redis_library.exceptions.TimeoutError),
        time_limit_errors=(SoftTimeLimitExceeded,),
    )


def cleanup(app: Any) -> dict[str, Any]:
    """Remove the store's temporaries whose owner is gone, and old staged
    files; each named, with why when it could not be removed."""
    from diskpipe.jobs.cleanup import clean
    from diskpipe.jobs.lease import Lease

    env = environment(app)
    client = redis(app)

    def is_live(image_id: str, owner: str) -> bool:
        # A temporary is live exactly while some delivery holds the image's lease.
        return bool(client.exists(Lease.PREFIX + image_id))

    return clean(env.store, env.import_config, is_live)


class _OneLineReconnects(logging.Filter):
    """A Redis restart is routine: the consumer's "connection lost" becomes
    one WARNING line without a traceback, and the per-attempt "cannot
    connect, trying again" lines (and the result backend's) drop to DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if "Connection to broker lost" in message:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = (
                "broker connection lost; reconnecting: %s",
                (record.exc_info[1] if record.exc_info else "",),
            )
            record.exc_info, record.exc_text = None, None
            return True
        if "Cannot connect to" in message or "Connection to Redis lost" in message:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info, record.exc_text = None, None
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_RECONNECT_LOGGERS = ("celery.worker.consumer.consumer", "celery.backends.redis", "celery.worker.consumer.connection")


def _belongs(worker_part: Any, app: Any) -> bool:
    return getattr(worker_part, "app", None) is app


def connect(app: Any) -> None:
    """Hook this app's worker start-up (signals are global; each handler acts
    only for the worker of its own app)."""

    def announce(sender: Any = None, instance: Any = None, **_: Any) -> None:
        if not _belongs(instance, app):
            return
        for name in _RECONNECT_LOGGERS:
            logging.getLogger(name).addFilter(_OneLineReconnects())
        if app.default_broker:
            log.warning(
                "no broker configured (-b, CELERY_BROKER_URL, DISKPIPE_BROKER_URL or [celery] broker_url): using %s",
                app.conf.broker_url,
            )

    def clean_on_start(sender: Any = None, **_: Any) -> None:
        if not _belongs(sender, app):
            return
        try:
            log.info("startup cleanup: %s", cleanup(app))
        except Exception as error:  # noqa: BLE001 - a cleanup failure must not stop the worker
            log.warning("startup cleanup failed: %s", error)

    signals.celeryd_init.connect(announce, weak=False)
    signals.worker_ready.connect(clean_on_start, weak=False)
