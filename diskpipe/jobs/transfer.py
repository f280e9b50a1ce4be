"""Limits that keep a download from being held open: a deadline for the whole
transfer, an idle limit per receive and a minimum rate over a sliding window.

A `Pacer` is created when a download starts and goes with it through the
connection, the TLS handshake, the headers, every redirect and every
receive. The sockets below re-arm their timeout before every `recv` to
what is left under all three limits, so a server sending one byte per
second is cut off at the deadline (or sooner, by the rate), however many
receives `http.client` does for one `read`.
"""

from __future__ import annotations

import math
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The rate is kept in this many buckets per window: memory stays bounded and
# the window's edge is off by at most 1/32 of it.
_BUCKETS_PER_WINDOW = 32
# Never hand a socket a timeout of 0 (that would make it non-blocking).
_SHORTEST_TIMEOUT = 0.01


class TransferTooSlow(Exception):
    """A download hit one of its time limits. The message names the limit.

    Deliberately not an OSError: io's buffered reader retries on
    InterruptedError and http.client turns some OSErrors into its own."""


@dataclass(frozen=True, slots=True)
class TransferLimits:
    total: float  # download_timeout: seconds for everything, redirects included
    idle: float  # read_timeout: seconds a single receive may wait
    connect: float  # connect_timeout: seconds a connection may take to open
    min_rate: int  # bytes/s averaged over `window`; 0: no minimum
    window: float  # min_rate_window, seconds

    def __post_init__(self) -> None:
        from diskpipe.config import ConfigError

        seconds = {
            "download_timeout": self.total,
            "read_timeout": self.idle,
            "connect_timeout": self.connect,
            "min_rate_window": self.window,
        }
        for key, value in seconds.items():
            if not value > 0:
                raise ConfigError(f"[import] {key} must be a positive number of seconds, not {value!r}")
        if self.min_rate < 0:
            raise ConfigError(f"[import] min_rate must be 0 (no minimum) or more bytes/s, not {self.min_rate}")


class Pacer:
    """The clock of one download."""

    def __init__(self, limits: TransferLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self.started = clock()
        self.deadline = self.started + limits.total
        self._bucket_width = limits.window / _BUCKETS_PER_WINDOW
        self._buckets: deque[list[int]] = deque()  # [bucket index, bytes], oldest first
        self._in_buckets = 0
        self.received_total = 0

    # -- the rate ----------------------------------------------------------

    def _bucket_index(self, moment: float) -> int:
        return math.floor((moment - self.started) / self._bucket_width)

    def _drop_old(self, moment: float) -> None:
        """Keep the buckets of the window that ends at `moment`."""
        oldest_kept = self._bucket_index(moment) - _BUCKETS_PER_WINDOW + 1
        while self._buckets and self._buckets[0][0] < oldest_kept:
            self._in_buckets -= self._buckets.popleft()[1]

    def _needed(self) -> float:
        return self.limits.min_rate * self.limits.window

    def _rate_failure(self, moment: float) -> str | None:
        if self.limits.min_rate <= 0 or moment - self.started < self.limits.window:
            return None  # the first window is grace for connecting and slow start
        self._drop_old(moment)
        if self._in_buckets >= self._needed():
            return None
        return (
            f"below min_rate {self.limits.min_rate} bytes/s: {self._in_buckets} bytes "
            f"in the last {self.limits.window:g} s (min_rate_window)"
        )

    def _until_rate_failure(self, now: float) -> float:
        """Seconds until the rate fails if nothing more arrives."""
        if self.limits.min_rate <= 0:
            return math.inf
        self._drop_old(now)
        moment = max(now, self.started + self.limits.window)
        remaining = self._in_buckets
        for index, count in self._buckets:
            leaves = self.started + (index + _BUCKETS_PER_WINDOW) * self._bucket_width
            if leaves > moment:
                if remaining < self._needed():
                    return moment - now
                moment = leaves
            remaining -= count
        return moment - now

    # -- what sockets ask ----------------------------------------------------

    def failure(self, now: float | None = None) -> str | None:
        """The limit already hit, if any."""
        now = self._clock() if now is None else now
        if now >= self.deadline:
            return f"download_timeout {self.limits.total:g} s reached"
        return self._rate_failure(now)

    def timeout(self, step: float | None = None) -> float:
        """The socket timeout for the next blocking step: what is left under
        the deadline, the rate and `step` (the idle limit by default)."""
        now = self._clock()
        if (reason := self.failure(now)) is not None:
            raise TransferTooSlow(reason)
        step = self.limits.idle if step is None else step
        left = min(self.deadline - now, step, self._until_rate_failure(now))
        return max(left, _SHORTEST_TIMEOUT)

    def timed_out(self, waiting_for: str, step: float | None = None) -> TransferTooSlow:
        """Why a step that ran out of time did."""
        if (reason := self.failure()) is not None:
            return TransferTooSlow(reason)
        if step is not None:
            return TransferTooSlow(f"{waiting_for}: nothing within {step:g} s")
        return TransferTooSlow(f"{waiting_for}: read_timeout {self.limits.idle:g} s without data")

    def received(self, count: int) -> None:
        """Count bytes that arrived; refuse when the rate has fallen too low."""
        now = self._clock()
        self.received_total += count
        index = self._bucket_index(now)
        if self._buckets and self._buckets[-1][0] == index:
            self._buckets[-1][1] += count
        else:
            self._buckets.append([index, count])
        self._in_buckets += count
        if (reason := self.failure(now)) is not None:
            raise TransferTooSlow(reason)

    def receive(self, sock: socket.socket, receive: Callable[[], int]) -> int:
        """Run one receive on `sock` under the limits and count what came."""
        sock.settimeout(self.timeout())
        try:
            count = receive()
        except TimeoutError as error:
            raise self.timed_out("receiving") from error
        self.received(count)
        return count


class PacedSocket(socket.socket):
    """A TCP socket whose every receive is bounded by its pacer."""

    pacer: Pacer | None = None

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        if self.pacer is None:
            return super().recv_into(buffer, nbytes, flags)
        return self.pacer.receive(self, lambda: super(PacedSocket, self).recv_into(buffer, nbytes, flags))


class PacedSSLSocket(ssl.SSLSocket):
    """The TLS counterpart; one TLS read is bounded as a whole by the timeout."""

    pacer: Pacer | None = None

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        if self.pacer is None:
            return super().recv_into(buffer, nbytes, flags)
        return self.pacer.receive(self, lambda: super(PacedSSLSocket, self).recv_into(buffer, nbytes, flags))


def connect(address: str, port: int, pacer: Pacer) -> PacedSocket:
    """A TCP connection to exactly `address`, within connect_timeout and the deadline."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = PacedSocket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(pacer.timeout(pacer.limits.connect))
        try:
            sock.connect((address, port))
        except TimeoutError as error:
            raise pacer.timed_out(f"connecting to {address} port {port}", pacer.limits.connect) from error
        sock.pacer = pacer
    except BaseException:
        sock.close()
        raise
    return sock


def start_tls(sock: PacedSocket, host: str, context: ssl.SSLContext, pacer: Pacer) -> PacedSSLSocket:
    """TLS over `sock`, the certificate checked against `host`; the handshake
    (however many receives it takes) within the idle limit and the deadline."""
    context.sslsocket_class = PacedSSLSocket
    sock.pacer = None
    try:
        tls = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    try:
        tls.settimeout(pacer.timeout())
        try:
            tls.do_handshake()
        except TimeoutError as error:
            raise pacer.timed_out(f"TLS handshake with {host}") from error
        assert isinstance(tls, PacedSSLSocket)
        tls.pacer = pacer
    except BaseException:
        tls.close()
        raise
    return tls
