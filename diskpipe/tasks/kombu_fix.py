"""A guard around one kombu bug that would kill workers when Redis restarts.

With late acknowledgement, a worker that loses its broker connection while
a job runs closes its channel and tries to hand the job's message back to
Redis at once (`QoS.restore_unacked`). By then kombu has already dropped the
connection's parameters, so building a new Redis client fails with
"AttributeError: 'NoneType' object has no attribute 'hostname'" — an
"Unrecoverable error" that ends the whole worker (seen with kombu 5.5 and
5.7; the family of kombu issues #582, #970).

The guard skips that immediate hand-back only when the connection is
already gone. Nothing is lost: the message is still in Redis's unacked set,
and any worker's periodic `restore_visible` returns it to the queue after
the visibility timeout; the job's lease and record make that second
delivery a no-op if the first one finished.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def install() -> None:
    from kombu.transport import redis as kombu_redis

    original: Any = kombu_redis.QoS.restore_unacked
    if getattr(original, "diskpipe_guard", False):
        return

    def restore_unacked(self: Any, client: Any = None) -> Any:
        transport = getattr(self.channel, "connection", None)
        if client is None and getattr(transport, "client", None) is None:
            log.warning(
                "broker connection gone: %d unacknowledged message(s) return after the visibility timeout",
                len(self._delivered),
            )
            self._delivered.clear()
            return None
        return original(self, client)

    restore_unacked.diskpipe_guard = True  # type: ignore[attr-defined]
    setattr(kombu_redis.QoS, "restore_unacked", restore_unacked)  # noqa: B010 - replacing a method on purpose
