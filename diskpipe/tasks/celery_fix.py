"""A guard around one Celery bug that prints a traceback on every broker restart.

When the broker connection is lost, Celery (5.7, where this was seen)
closes and drops it (`Consumer.on_connection_error_after_connected` sets
`connection` to None) before it restarts the consumer's bootsteps. A consumer step (`Gossip`, on
by default) then closes its channel with `ignore_errors(c.connection, ...)`:
with Redis still down the close fails, and kombu, asked to ignore the
errors of None, raises AttributeError ("'NoneType' object has no attribute
'connection_errors'"), which Celery logs as "Error on restarting Gossip"
with a traceback of some hundred lines. Nothing else goes wrong: the
channel belonged to the dead connection anyway.

The guard hands the step the consumer itself when the connection is gone:
it carries the same `connection_errors`/`channel_errors`, so the failed
close is ignored as it was meant to be.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


def install() -> None:
    from celery import bootsteps

    original: Any = bootsteps.ConsumerStep._close
    if getattr(original, "diskpipe_guard", False):
        return

    def close(self: Any, c: Any, cancel_consumers: bool = True) -> Any:
        if getattr(c, "connection", None) is None and hasattr(c, "connection_errors"):
            # `_close` reads only `c.connection`, and only for its error types.
            return original(self, SimpleNamespace(connection=c), cancel_consumers)
        return original(self, c, cancel_consumers)

    close.diskpipe_guard = True  # type: ignore[attr-defined]
    setattr(bootsteps.ConsumerStep, "_close", close)  # noqa: B010 - replacing a method on purpose
