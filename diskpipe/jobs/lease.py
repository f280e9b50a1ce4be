"""A lease per image id in Redis, renewed by a heartbeat while a job works.

With the Redis transport a job whose worker died comes back after the
visibility timeout; a timeout shorter than a job redelivers a job that is
still running. The lease makes both safe: a delivery that finds a live lease
waits for it (or for the record to end), one that finds an expired lease
takes the job over, and no two deliveries ever work on one image at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    PREFIX = "diskpipe:lease:"

    def __init__(self, client: Any, image_id: str, owner: str, ttl: float = 30.0) -> None:
        self.redis = client
        self.key = self.PREFIX + image_id
        self.owner = owner
        self.ttl = ttl
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = threading.Event()

    def try_acquire(self) -> bool:
        return bool(self.redis.set(self.key, self.owner, nx=True, px=int(self.ttl * 1000)))

    def holder(self) -> str | None:
        raw = self.redis.get(self.key)
        return raw.decode() if isinstance(raw, bytes) else raw

    def acquire(self, *, give_up: Callable[[], bool], poll: float = 1.0, timeout: float | None = None) -> bool:
        """Take the lease, waiting while another live holder renews it.

        Returns False when `give_up()` says the wait is pointless (the
        record reached a final state) or the timeout passes.
        """
        deadline = time.monotonic() + timeout if timeout is not None else None
        while True:
            if self.try_acquire():
                return True
            if give_up():
                return False
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(poll)

    def start_heartbeat(self, on_tick: Callable[[], None] | None = None, interval: float | None = None) -> None:
        """Renew the lease every `interval` (a third of the TTL) on a thread;
        `on_tick` runs on each beat (the job checks for cancellation there)."""
        every = interval if interval is not None else self.ttl / 3

        def beat() -> None:
            while not self._stop.wait(every):
                try:
                    # Once lost a lease stays lost (the job is fenced and ends at its next
                    # step): one warning, not one per beat; the beat goes on for `on_tick`.
                    if not self.lost.is_set() and not self._renew(
                        keys=[self.key], args=[self.owner, int(self.ttl * 1000)]
                    ):
                        # Lost first: asking who holds it now is a second
                        # round trip that may fail, and must not delay the fence.
                        self.lost.set()
                        holder = self.holder()
                        log.warning("lease %s %s", self.key, f"taken over by {holder}" if holder else "expired")
                    if on_tick is not None:
                        on_tick()
                except Exception as error:  # noqa: BLE001 - Redis restarting: keep beating
                    log.warning("lease %s: heartbeat failed: %s", self.key, error)

        self._thread = threading.Thread(target=beat, name=f"lease-{self.key}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for _ in range(10):
            try:
                self._release(keys=[self.key], args=[self.owner])
                return
            except Exception as error:  # noqa: BLE001 - retried; an unreleased lease expires by itself
                log.warning("lease %s: release failed: %s", self.key, error)
                time.sleep(1)

    def held_by_anyone(self) -> bool:
        return bool(self.redis.exists(self.key))
