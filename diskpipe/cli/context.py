"""What a job command works against: the broker (if any), the store and
the records.

With a broker (`--broker`, CELERY_BROKER_URL, DISKPIPE_BROKER_URL or
`[celery] broker_url`) jobs go to the Celery workers and records live in
its Redis; without one, jobs run in this process with the configured store
and records in a local SQLite file. A command-line user waits for nobody:
an unreachable broker fails within seconds, with a message that names it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit


class BrokerUnreachable(Exception):
    """The broker cannot be reached or its URL is not usable (exit 2)."""


def shown_url(url: str) -> str:
    """The URL for a message, its password (if any) replaced by ***."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if parts.port is not None:
            host += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:  # an unparsable port: show no part that may hold a secret
        return "<unparsable URL>"


def broker(args: argparse.Namespace) -> str | None:
    from diskpipe.config import load
    from diskpipe.tasks.settings import CeleryConfig, broker_url

    return broker_url(load(CeleryConfig), getattr(args, "broker", None))


def store_config(args: argparse.Namespace) -> tuple[Any, str | None]:
    """The `[store]` section, changed by `--store KIND[:ARGUMENT]`."""
    from diskpipe.config import load
    from diskpipe.converter.stores.registry import StoreConfig, parse_store_option

    base = load(StoreConfig)
    store = getattr(args, "store", None)
    return parse_store_option(store, base) if store else (base, None)


def make_store(args: argparse.Namespace) -> Any:
    from diskpipe.converter.stores.registry import make_store as build

    config, argument = store_config(args)
    return build(config, argument)


PROBE_TIMEOUT = 3.0  # seconds a broker gets to connect, and then to answer a PING


def _answering_redis(url: str, role: str) -> Any:
    """A Redis client for `url`, once a probe has had a PING answered: a
    closed port fails at once, a host or server that stays silent after
    PROBE_TIMEOUT (the client's own timeouts, meant for a working Redis,
    would wait tens of seconds). `role` names it: broker, result backend."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from diskpipe.jobs.connection import redis_client

    try:
        probe = redis.Redis.from_url(
            url, socket_connect_timeout=PROBE_TIMEOUT, socket_timeout=PROBE_TIMEOUT, retry=Retry(NoBackoff(), 0)
        )
        try:
            probe.ping()
        finally:
            probe.close()
    except ValueError as error:  # redis-py: not a redis:// URL
        raise BrokerUnreachable(f"{role} {shown_url(url)}: {error}") from error
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
        raise BrokerUnreachable(f"{role} {shown_url(url)} is unreachable: {error}") from error
    return redis_client(url, ride_out_restarts=False)


def redis_records(url: str) -> Any:
    """The broker's records, checked to answer."""
    from diskpipe.jobs.records import RedisRecords

    return RedisRecords(_answering_redis(url, "broker"))


def check_result_backend(url: str) -> None:
    """A result backend of its own (`[celery] result_backend`) that is a
    Redis must answer before a job is recorded: sending the job needs it."""
    from diskpipe.config import load
    from diskpipe.tasks.settings import CeleryConfig

    backend = load(CeleryConfig).result_backend
    if backend and backend != url and backend.startswith(("redis://", "rediss://", "unix://")):
        _answering_redis(backend, "result backend")


def records(args: argparse.Namespace) -> Any:
    """The records: the broker's Redis, else the embedded SQLite file."""
    url = broker(args)
    if url:
        return redis_records(url)
    from diskpipe.jobs.records import SqliteRecords

    config, _ = store_config(args)
    return SqliteRecords(config.records)


# Celery's result backend logs each reconnect attempt, and its giving up, at
# ERROR and CRITICAL over several lines; the command says it in one.
RECONNECT_LOGGERS = ("celery.backends.redis", "celery.backends.asynchronous")


@contextlib.contextmanager
def _celery_reconnects_quiet() -> Iterator[None]:
    """Silence those loggers, unless -v or --debug asked for detail."""
    if logging.getLogger().getEffectiveLevel() <= logging.INFO:
        yield
        return
    loggers = [logging.getLogger(name) for name in RECONNECT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def send_task(url: str, name: str, **options: Any) -> Any:
    """Send a task with an app that gives up on an unreachable broker or
    result backend within seconds; returns its AsyncResult."""
    from kombu.exceptions import OperationalError

    from diskpipe.tasks.factory import client_app

    app = client_app(url)
    try:
        with _celery_reconnects_quiet():
            return app.send_task(name, queue=app.settings.queue, **options)
    except OperationalError as error:  # kombu could not publish
        raise BrokerUnreachable(f"broker {shown_url(url)} is unreachable: {error}") from error
    except RuntimeError as error:  # Celery's Redis result backend gave up reconnecting (before publishing)
        backend = shown_url(str(app.conf.result_backend))
        raise BrokerUnreachable(f"result backend {backend} is unreachable (Celery gave up reconnecting)") from error
