"""The `[celery]` and `[store]` sections, and the objects built from them.

Broker and result backend: `[celery] broker_url`, or `DISKPIPE_BROKER_URL`
(the short form the README uses), or `DISKPIPE_CELERY_BROKER_URL`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from diskpipe.config import load_file, load_section
from diskpipe.converter.stores import registry
from diskpipe.converter.stores.base import Store


def _data_home() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "diskpipe")


@dataclass(frozen=True, slots=True)
class CeleryConfig:
    """The `[celery]` section. Every value was chosen for not losing jobs;
    see the README's "Reliability" section for why."""

    broker_url: str | None = None  # None: no broker, `diskpipe import` runs in process
    result_backend: str | None = None  # default: the broker
    # How long Redis keeps a delivered job before giving it to another worker
    # when its worker never acknowledged it (a dead worker's job comes back
    # after this). Leases make a shorter value safe for running jobs.
    visibility_timeout: int = 3600
    # Seconds between the sweeps that hand such a job back to the queue.
    # None: kombu's own pace (one sweep in ten ticks of 10 s). Tests with a
    # short visibility timeout sweep more often.
    redelivery_sweep: int | None = None
    lease_ttl: int = 30  # seconds a job's lease lives without a heartbeat
    lease_wait: int = 6 * 3600  # how long a second delivery waits for a live lease
    time_limit: int = 6 * 3600  # hard limit per job (the worker child is killed)
    soft_time_limit: int = 6 * 3600 - 120  # the job stops itself cleanly first
    max_retries: int = 5  # transient failures only (Ceph, Redis, network)
    retry_backoff_max: int = 300
    queue: str = "diskpipe"
    concurrency: int | None = None  # worker processes (default: CPU count)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """The `[store]` section: where images and (embedded) records go."""

    kind: str = "file"  # file | rbd | s3 (each reads its own section: [rbd], [s3])
    directory: str = os.path.join(_data_home(), "images")
    records: str = os.path.join(_data_home(), "records.sqlite")


def load_celery_config(path: str | None = None, **overrides: Any) -> CeleryConfig:
    if overrides.get("broker_url") is None and os.environ.get("DISKPIPE_BROKER_URL"):
        overrides["broker_url"] = os.environ["DISKPIPE_BROKER_URL"]
    return load_section(CeleryConfig, "celery", load_file(path).get("celery", {}), **overrides)


def load_store_config(path: str | None = None, **overrides: Any) -> StoreConfig:
    return load_section(StoreConfig, "store", load_file(path).get("store", {}), **overrides)


def make_store(config: StoreConfig, argument: str | None = None) -> Store:
    """The store `[store] kind` names (or `--store`), from its own section."""
    return registry.create(config.kind, argument, directory=config.directory)


def parse_store_option(value: str, base: StoreConfig) -> tuple[StoreConfig, str | None]:
    """`--store KIND[:ARGUMENT]` -> store config and the argument (the file
    store's directory, the RBD pool, the S3 bucket)."""
    kind, argument = registry.parse_spec(value)
    directory = argument if kind == "file" and argument else base.directory
    return StoreConfig(kind=kind, directory=directory, records=base.records), argument


def redis_client(url: str) -> Any:
    """A Redis client that rides out a restart: every command is retried with
    backoff for about a minute before it fails."""
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        socket_timeout=30,
        socket_connect_timeout=5,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=5, base=0.2), retries=20),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    )
