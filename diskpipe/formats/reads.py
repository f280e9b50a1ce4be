"""How inspectors ask for bytes, and the two drivers that answer them.

An inspector is a generator: it yields a request (`Read`, `ReadTail`,
`GetSize`) and receives the answer through `send`. The same inspector code
then serves a file (answered at once with `os.pread`) and a stream fed in
chunks of any size (answered when the stream passes the asked-for range).

Stream memory is bounded: the driver keeps the first `HEAD_RETAIN` bytes,
the last `TAIL_RETAIN` bytes and one pending request of at most
`MAX_READ` bytes. A request for bytes the stream has already passed (and that
lie outside the head) is answered by throwing `Unavailable` into the
inspector, which leaves the facts that need them unset.
"""

from __future__ import annotations

import os

from diskpipe.formats.errors import Unavailable

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from collections.abc import Callable, Generator
    from typing import Any, NamedTuple, TypeVar

    T = TypeVar("T")
    # An inspector: yields requests, receives bytes (or an int for GetSize).
    Inspection = Generator["Request", Any, T]
else:
    from diskpipe.formats.tuples import NamedTuple

# Everything the content sniffers and every header parser look at lies in the
# first 128 KiB (btrfs' superblock at 0x10040 is the furthest), so keeping it
# lets inspectors re-read headers in any order, also in stream mode.
HEAD_RETAIN = 128 * 1024
# A VMDK stream footer (footer marker, header copy, end-of-stream marker) is
# the largest structure read relative to the end: 1536 bytes.
TAIL_RETAIN = 4096
# No single request may be larger: a stream holds at most this much for it.
MAX_READ = 1024 * 1024 + 64 * 1024


# Requests are NamedTuples, not dataclasses: importing dataclasses (and the
# `inspect` module it pulls in) would cost the CLI several milliseconds.
class Read(NamedTuple):
    """Bytes [offset, offset + length); the answer is shorter at end of data."""

    offset: int
    length: int


class ReadTail(NamedTuple):
    """The last `length` bytes of the image (all of it if it is shorter)."""

    length: int


class GetSize(NamedTuple):
    """The total image size in bytes."""


Request = Read | ReadTail | GetSize


def _check_request(request: Request) -> None:
    if isinstance(request, Read):
        if request.offset < 0 or request.length < 0 or request.length > MAX_READ:
            raise AssertionError(f"inspector asked for an unbounded read: {request}")
    elif isinstance(request, ReadTail):
        if not 0 <= request.length <= TAIL_RETAIN:
            raise AssertionError(f"inspector asked for too long a tail: {request}")
    elif not isinstance(request, GetSize):
        raise AssertionError(f"inspector yielded {request!r}, not a request")


def run_on_reader(
    inspection: Generator[Request, Any, T],
    read_at: Callable[[int, int], bytes],
    size: int,
    head_read: int = HEAD_RETAIN,
) -> T:
    """Drive an inspector over any positioned reader of known size
    (a file descriptor, an RBD image...).

    The answer to a read from offset 0 (the detector's head) is kept, and a
    later read inside it, or the tail of data it holds whole, is cut from it:
    the same bytes, without another call to the reader (a system call for a
    file, a round trip for RBD). It is the only thing kept, and at most
    `MAX_READ` bytes. A read from offset 0 asks the reader for at least
    `head_read` bytes: for a reader whose calls cost a round trip, the
    detector's first read and the rest of the head come in one."""
    # This loop runs for every request of every image: a request is told by
    # its exact type and unpacked as the tuple it is (no attribute lookups),
    # and a read is checked inline; the rarer requests go to helpers.
    head = b""
    send = inspection.send
    try:
        request = next(inspection)
        while True:
            if type(request) is Read:
                start, length = request
                if start < 0 or length < 0 or length > MAX_READ:
                    _check_request(request)  # raises
                end = start + length
                end = size if end > size else end  # min() is a call: this runs per request
                if start >= end:
                    answer: bytes | int = b""
                elif end <= len(head):
                    answer = head[start:end]
                elif start:
                    answer = read_at(start, end - start)
                else:
                    head = read_at(0, end if end >= head_read else min(head_read, size))
                    answer = head[:end] if len(head) > end else head
            elif type(request) is GetSize:
                answer = size
            elif type(request) is ReadTail:
                answer = _tail(request, head, read_at, size)
            else:
                request = _exact_request(request)
                continue
            request = send(answer)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


def _tail(request: ReadTail, head: bytes, read_at: Callable[[int, int], bytes], size: int) -> bytes:
    """The answer to a ReadTail: from the head when it holds all the data."""
    length = request.length
    if not 0 <= length <= TAIL_RETAIN:  # checked inline, as a Read is: every image asks for its tail
        _check_request(request)  # raises
    length = min(length, size)
    if not length:
        return b""
    if size <= len(head):
        return head[size - length : size]
    return read_at(size - length, length)


def _exact_request(request: Request) -> Request:
    """A request of a subclass of a request type, as that type; raises for
    anything that is no request."""
    _check_request(request)
    if isinstance(request, Read):
        return Read(request.offset, request.length)
    if isinstance(request, ReadTail):
        return ReadTail(request.length)
    return GetSize()


def run_on_file(inspection: Generator[Request, Any, T], fd: int, size: int) -> T:
    """Drive an inspector over an open file descriptor of known size."""
    # A system call is cheap; copying bytes nobody reads is not: the reads
    # are as long as asked.
    return run_on_reader(inspection, lambda offset, length: os.pread(fd, length, offset), size, head_read=0)


class StreamDriver:
    """Drives one inspector over data that arrives in chunks, in order.

    `feed` takes chunks of any size; `finish` marks the end and returns the
    inspector's result. Memory held: `HEAD_RETAIN + TAIL_RETAIN + MAX_READ`
    bytes at most, whatever the chunk size.
    """

    def __init__(self, inspection: Generator[Request, Any, Any]) -> None:
        self._inspection = inspection
        self._position = 0  # bytes fed so far
        self._head = bytearray()
        self._tail = bytearray()
        self._finished = False
        self._done = False
        self._result: Any = None
        self._error: BaseException | None = None
        self._capture: bytearray | None = None  # the pending Read being filled
        self._captured = 0
        self._pending: Request | None = None
        self._advance(None, first=True)

    @property
    def position(self) -> int:
        return self._position

    @property
    def error(self) -> BaseException | None:
        """What the inspector raised (also an unbounded or malformed request)."""
        return self._error

    # -- driving the generator -------------------------------------------------
    def _advance(self, answer: Any, *, first: bool = False, throw: BaseException | None = None) -> None:
        """Send an answer (or throw) and store the next request."""
        self._capture = None
        self._captured = 0
        try:
            if first:
                request = next(self._inspection)
            elif throw is not None:
                request = self._inspection.throw(throw)
            else:
                request = self._inspection.send(answer)
            # A bad request is the inspector's error, reported like its others.
            _check_request(request)
        except StopIteration as stop:
            self._done = True
            self._pending = None
            self._result = stop.value
            return
        except BaseException as error:  # noqa: BLE001 - re-raised from finish()/feed()
            self._done = True
            self._pending = None
            self._error = error
            return
        self._pending = request

    def _serve(self, chunk: memoryview, chunk_start: int) -> None:
        """Answer pending requests from the head, the current chunk and captures."""
        while not self._done:
            request = self._pending
            if isinstance(request, (GetSize, ReadTail)):
                if not self._finished:
                    return  # the size and the tail are known only at the end
                self._advance(self._end_answer(request))
                continue
            assert isinstance(request, Read)
            start, end = request.offset, request.offset + request.length
            if self._finished:
                end = min(end, self._position)
            if self._capture is None and self._answer_or_start_capture(start, end, chunk_start, len(chunk)):
                continue
            if not self._capture_from(chunk, chunk_start, end):
                continue
            assert self._capture is not None
            # Finished: the end of data lies inside the request, a short read as from a file.
            if self._captured >= end or self._finished:
                self._advance(bytes(self._capture))
                continue
            return

    def _end_answer(self, request: GetSize | ReadTail) -> bytes | int:
        """The answer to a GetSize or ReadTail, once the stream has ended."""
        if isinstance(request, GetSize):
            return self._position
        length = min(request.length, self._position)
        return bytes(self._tail[len(self._tail) - length :]) if length else b""

    def _answer_or_start_capture(self, start: int, end: int, chunk_start: int, chunk_length: int) -> bool:
        """Answer a read from the head or the tail (or refuse bytes already
        passed), and return True; or start capturing it and return False."""
        if end <= start:
            self._advance(b"")
            return True
        if end <= len(self._head):
            self._advance(bytes(self._head[start:end]))
            return True
        tail_start = self._position - len(self._tail)
        if self._finished and start >= tail_start:
            self._advance(bytes(self._tail[start - tail_start : end - tail_start]))
            return True
        # The part before the current chunk must come from the head.
        if start < chunk_start and start < len(self._head) and len(self._head) >= chunk_start:
            self._capture = bytearray(self._head[start:chunk_start])
        elif start < chunk_start or (self._finished and start >= chunk_start + chunk_length):
            self._advance(None, throw=Unavailable(f"bytes at {start} already passed"))
            return True
        else:
            self._capture = bytearray()
        self._captured = start + len(self._capture)
        return False

    def _capture_from(self, chunk: memoryview, chunk_start: int, end: int) -> bool:
        """Copy the overlap of [captured, end) with the current chunk; False
        when a gap before it made the read unavailable."""
        assert self._capture is not None
        chunk_end = chunk_start + len(chunk)
        if self._captured < chunk_end and end > chunk_start:
            lo = max(self._captured, chunk_start)
            hi = min(end, chunk_end)
            if lo < hi:
                if lo != self._captured:
                    self._advance(None, throw=Unavailable(f"bytes at {self._captured} already passed"))
                    return False
                self._capture += chunk[lo - chunk_start : hi - chunk_start]
                self._captured = hi
        return True

    # -- public feeding API ----------------------------------------------------
    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        view = memoryview(chunk).cast("B")
        if not len(view):
            return
        chunk_start = self._position
        self._position += len(view)
        if len(self._head) < HEAD_RETAIN:
            self._head += view[: HEAD_RETAIN - len(self._head)]
        if not self._done:
            self._serve(view, chunk_start)
            if self._error is not None:
                # Broken input is reported as soon as it is seen.
                raise self._error
        if len(view) >= TAIL_RETAIN:
            self._tail = bytearray(view[-TAIL_RETAIN:])
        else:
            self._tail += view
            del self._tail[: max(0, len(self._tail) - TAIL_RETAIN)]

    def finish(self) -> Any:
        if not self._finished:
            self._finished = True
            if not self._done:
                self._serve(memoryview(b""), self._position)
        if self._error is not None:
            raise self._error
        return self._result
