"""The Celery app, built by a factory.

Task names are stable strings and are routed by name to the `[celery] queue`
(default `diskpipe`), so another service can submit without importing
diskpipe:

    app.send_task("diskpipe.import_image", kwargs={"image_id": "…", "source": "…",
                  "claimed_format": "qcow2"}, queue="diskpipe")

(`queue=` may be left out with this app, whose `task_routes` send every
`diskpipe.*` task there). The broker follows Celery's rules: `-b`/
CELERY_BROKER_URL, then DISKPIPE_BROKER_URL, then `[celery] broker_url`.

Reliability, chosen on purpose:
- acks_late + reject_on_worker_lost: a job is acknowledged only when it
  ends, and a killed worker child hands its job back to the queue;
- prefetch 1: a worker holds only the job it runs, so a dead worker strands
  one job at most;
- visibility timeout: a dead worker's unacknowledged job returns after it;
  the per-image lease keeps a redelivered job from running beside a live one;
- Celery's own autoretry with exponential backoff, only for transient
  failures (Ceph, Redis or the network unreachable), never for a refused image;
- hard and soft time limits per job;
- task events on, so Flower and `celery events` see every job.
"""

from __future__ import annotations

import logging
from functools import cache

from celery import Celery

from diskpipe.tasks import kombu_fix
from diskpipe.tasks.settings import DEFAULT_BROKER, CeleryConfig, broker_url

log = logging.getLogger(__name__)


class DiskpipeCelery(Celery):  # type: ignore[misc]  # Celery carries no types
    """A Celery app that knows diskpipe's `[celery]` section."""

    settings: CeleryConfig
    default_broker: bool  # no broker was configured: DEFAULT_BROKER is used


def create_app(config: CeleryConfig | None = None, broker: str | None = None) -> DiskpipeCelery:
    """An app for workers and clients: `config` defaults to the `[celery]`
    section, `broker` to the configured one (Celery's -b wins, as usual)."""
    from diskpipe.config import load

    kombu_fix.install()
    config = config if config is not None else load(CeleryConfig)
    chosen = broker_url(config, broker)
    app = DiskpipeCelery("diskpipe", set_as_current=False)
    app.settings = config
    app.default_broker = chosen is None
    url = chosen or DEFAULT_BROKER
    app.conf.update(
        broker_url=url,
        result_backend=config.result_backend or url,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        task_time_limit=config.time_limit,
        task_soft_time_limit=config.soft_time_limit,
        task_default_queue=config.queue,
        task_routes={"diskpipe.*": {"queue": config.queue}},
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=7 * 24 * 3600,
        result_extended=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker keeps reconnecting while Redis restarts
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
    from diskpipe.tasks import jobs, worker

    jobs.register(app)
    worker.connect(app)
    return app


def client_app(broker: str) -> DiskpipeCelery:
    """An app a command-line client submits with: it gives up on an
    unreachable broker within seconds instead of retrying for minutes."""
    app = create_app(broker=broker)
    app.conf.broker_connection_timeout = 3
    app.conf.broker_connection_max_retries = 1
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        "max_retries": 1,
        "socket_connect_timeout": 3,
    }
    app.conf.result_backend_transport_options = {"retry_policy": {"timeout": 2.0, "max_retries": 2}}
    return app


@cache
def default_app() -> DiskpipeCelery:
    """The app `celery -A diskpipe.tasks` finds (built once per process)."""
    return create_app()
