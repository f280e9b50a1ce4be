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
    from diskpipe.converter.stores.base import owner_tag
    from diskpipe.converter.stores.registry import StoreConfig, make_store
    from diskpipe.formats.policy import load_policy
    from diskpipe.jobs.lease import Lease
    from diskpipe.jobs.pipeline import Environment
    from diskpipe.jobs.records import RedisRecords
    from diskpipe.jobs.sources import ImportConfig

    client = redis(app)
    settings = app.settings
    owner = owner_tag()  # host name, boot and pid namespace key, pid: unique to this process
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
    """A Redis restart is routine: one WARNING line, no traceback.

    What Celery logs for it (read in Celery and kombu 5.7: the modules
    celery.worker.consumer.consumer, celery.backends.redis, kombu.message)
    and what becomes of each:
    - the consumer's "Connection to broker lost. Trying to re-establish the
      connection..." at WARNING (older releases: with the traceback; 5.7:
      with the error's repr in the arguments, which redis-py 8 shortens to
      "network:ConnectionError"): one WARNING line that names the error;
    - its "Cannot connect to URL: ERROR. Trying again in N seconds..." at
      ERROR, once per attempt until Redis answers: DEBUG while reconnecting
      after a loss (at start-up they stay: a broker that never answered is a
      setup mistake to show);
    - the result backend's "Connection to Redis lost: Retry (n/m) in N
      seconds." at ERROR, once per attempt: DEBUG;
    - kombu's "Couldn't ack TAG, reason: ERROR" at CRITICAL with the
      traceback, for a job that ended after the connection it came on was
      lost (kombu_fix turns the dead channel's AttributeError into that
      connection error): one INFO line. Nothing is lost: the message stays
      in Redis's unacked set and returns after the visibility timeout, and
      the image's record makes that delivery a no-op.
    The consumer's "Connected to URL" (INFO) ends the reconnect.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reconnecting = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        first = str(record.args[0]) if isinstance(record.args, tuple) and record.args else ""
        if "Connection to broker lost" in message or "Connection to broker lost" in first:
            self.reconnecting = True
            error = record.exc_info[1] if record.exc_info else _last_arg(record)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "broker connection lost (%s); reconnecting", (_describe(error),)
            record.exc_info, record.exc_text = None, None
            return True
        if message.startswith(("Couldn't ack", "Couldn't reject")):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = (
                "task message %r not acknowledged: its broker connection is gone (%s); "
                "it returns after the visibility timeout"
            )
            record.args = (first, _describe(_last_arg(record)))
            record.exc_info, record.exc_text = None, None
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        if message.startswith("Connected to"):
            self.reconnecting = False
            return True
        if ("Cannot connect to" in message and self.reconnecting) or "Connection to Redis lost" in message:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info, record.exc_text = None, None
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def _last_arg(record: logging.LogRecord) -> Any:
    return record.args[-1] if isinstance(record.args, tuple) and record.args else None


def _describe(error: Any) -> str:
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return str(error) if error is not None else "no error given"


# The loggers those lines come from (Celery's `get_logger(__name__)`).
_RECONNECT_LOGGERS = (
    "celery.worker.consumer.consumer",
    "celery.worker.consumer.connection",
    "celery.backends.redis",
    "celery.worker.request",  # where the worker's acknowledgements are logged
)

# Celery warns at every connection loss that it will cancel running jobs
# there in 6.0 unless told otherwise; create_app tells it otherwise
# (worker_cancel_long_running_tasks_on_connection_loss=False) on purpose.
_CANCEL_WARNING = r"\s*In Celery 5\.1 we introduced an optional breaking change which\s+on connection loss cancels"


def _belongs(worker_part: Any, app: Any) -> bool:
    return getattr(worker_part, "app", None) is app


def connect(app: Any) -> None:
    """Hook this app's worker start-up (signals are global; each handler acts
    only for the worker of its own app)."""

    def prepare(sender: Any = None, instance: Any = None, **_: Any) -> None:
        # celeryd_after_setup: the worker's logging is set up (so the broker
        # line reaches its log and --logfile with level and time, and Celery's
        # own "always" filter for its deprecation warnings is in place to be
        # overridden), and the consumer has not connected yet.
        if not _belongs(instance, app):
            return
        import warnings

        from celery.exceptions import CPendingDeprecationWarning

        from diskpipe.tasks import celery_fix

        celery_fix.install()
        warnings.filterwarnings("ignore", _CANCEL_WARNING, CPendingDeprecationWarning)
        reconnects = _OneLineReconnects()
        for name in _RECONNECT_LOGGERS:
            logging.getLogger(name).addFilter(reconnects)
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

    signals.celeryd_after_setup.connect(prepare, weak=False)
    signals.worker_ready.connect(clean_on_start, weak=False)
