"""The `[celery]` section, and which broker a command or worker uses."""

from __future__ import annotations

import os
from dataclasses import dataclass

from diskpipe.config import section


@section("celery")
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
    # Transient failures only (Ceph, Redis, network), with Celery's
    # exponential backoff: retry_backoff, 2x, 4x ... capped at
    # retry_backoff_max seconds. The defaults wait 15+30+60+120+240+300 s,
    # about 13 minutes in all: a Ceph monitor election or a short OSD outage
    # passes. retry_jitter randomises each wait below its value (spreads a
    # crowd of retries, but shortens the window).
    max_retries: int = 6
    retry_backoff: int = 15
    retry_backoff_max: int = 300
    retry_jitter: bool = False
    queue: str = "diskpipe"
    concurrency: int | None = None  # worker processes (default: CPU count)


DEFAULT_BROKER = "redis://127.0.0.1:6379/0"  # a worker's broker when none is configured


def broker_url(config: CeleryConfig, explicit: str | None = None) -> str | None:
    """The broker, by Celery's rules first: `--broker`/`-b`, then
    CELERY_BROKER_URL (what `celery -b` sets), then DISKPIPE_BROKER_URL (the
    short form the README uses), then `[celery] broker_url` (or
    DISKPIPE_CELERY_BROKER_URL). None: no broker configured (the command
    line then runs jobs in process; a worker uses DEFAULT_BROKER)."""
    return explicit or os.environ.get("CELERY_BROKER_URL") or os.environ.get("DISKPIPE_BROKER_URL") or config.broker_url
