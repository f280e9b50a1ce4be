"""A guard around one kombu bug that would kill workers when Redis restarts.

With late acknowledgement, a worker that loses its broker connection while
a job runs later tries to use the dead channel: to hand the job's message
back at once (`QoS.restore_unacked`, when the channel closes) or to
acknowledge it when the job ends (`QoS.ack`). By then kombu has dropped the
connection's parameters, so building a Redis client fails with
"AttributeError: 'NoneType' object has no attribute 'hostname'" (or
"... 'client'") — an "Unrecoverable error" that ends the whole worker (seen
with kombu 5.5 and 5.7; the family of kombu issues #582, #970).

The guard turns that into the connection error it really is. kombu and
Celery already handle those on these paths (the restore is skipped, the ack
is logged as impossible), and nothing is lost: the message is still in
Redis's unacked set, any worker's periodic `restore_visible` returns it to
the queue after the visibility timeout, and the job's lease and record make
that second delivery a no-op if the first one finished.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def install() -> None:
    import redis
    from kombu.transport import redis as kombu_redis

    original: Any = kombu_redis.Channel._connparams
    if getattr(original, "diskpipe_guard", False):
        return

    def connparams(self: Any, asynchronous: bool = False) -> Any:
        transport = getattr(self, "connection", None)
        if transport is None or getattr(transport, "client", None) is None:
            raise redis.exceptions.ConnectionError("the broker connection is gone (it will be re-established)")
        return original(self, asynchronous=asynchronous)

    connparams.diskpipe_guard = True  # type: ignore[attr-defined]
    setattr(kombu_redis.Channel, "_connparams", connparams)  # noqa: B010 - replacing a method on purpose
