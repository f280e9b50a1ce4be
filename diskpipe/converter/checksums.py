"""Checksums of stored raw data.

Glance-compatible: `checksum` (md5) and `os_hash_algo`/`os_hash_value`
(sha512) over every byte of the raw image, holes included, so a client can
verify a download against them. Neither hash can skip a zero run, so the
cost is the hashing itself (~1.7 s per GiB for md5, ~2.1 s for sha512 here):
each algorithm runs in its own thread (hashlib drops the GIL), so the two
share the two cores; holes are fed from one shared zero buffer without being
read, and only extents that hold data are read from the store.

Opt-in `sparse` digest (`diskpipe_sparse_hash_*`): sha256 over every 64 KiB
block that is not all zeros, each prefixed with its offset, then the total
size. It depends only on the bytes, so anyone can recompute it from a
download, and it costs only the allocated data. It is never stored under
Glance's keys.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

GLANCE_HASH_ALGO = "sha512"
SPARSE_HASH_ALGO = "sha256-sparse64k-v1"
SPARSE_BLOCK = 64 * 1024
READ_PIECE = 4 * 1024 * 1024  # a multiple of SPARSE_BLOCK
ZERO_PIECE = bytes(16 * 1024 * 1024)
_QUEUE_DEPTH = 8  # buffers in flight per hashing thread (bounds memory)
READ_AHEAD = 2  # pieces read ahead of the one being hashed

Extent = tuple[int, int, bool]  # (offset, length, holds data)


@dataclass(frozen=True, slots=True)
class Checksums:
    size: int
    md5: str | None = None
    sha512: str | None = None
    sparse: str | None = None

    def glance_properties(self, *, include_sparse: bool = True) -> dict[str, Any]:
        """The keys Glance stores, and diskpipe's own for the sparse digest."""
        out: dict[str, Any] = {"size": self.size}
        if self.md5 is not None:
            out["checksum"] = self.md5
        if self.sha512 is not None:
            out["os_hash_algo"] = GLANCE_HASH_ALGO
            out["os_hash_value"] = self.sha512
        if self.sparse is not None and include_sparse:
            out["diskpipe_sparse_hash_algo"] = SPARSE_HASH_ALGO
            out["diskpipe_sparse_hash_value"] = self.sparse
        return out


class _HashThread:
    """One hash algorithm fed from a bounded queue on its own thread."""

    def __init__(self, name: str) -> None:
        self.hasher = hashlib.new(name)
        self._queue: queue.Queue[bytes | memoryview | int | None] = queue.Queue(_QUEUE_DEPTH)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"hash-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if isinstance(item, int):  # a run of zeros of this length
                    remaining = item
                    while remaining:
                        piece = min(remaining, len(ZERO_PIECE))
                        self.hasher.update(memoryview(ZERO_PIECE)[:piece])
                        remaining -= piece
                else:
                    self.hasher.update(item)
        except BaseException as error:  # noqa: BLE001 - re-raised in finish()
            self._error = error

    def put(self, item: bytes | memoryview | int) -> None:
        self._queue.put(item)

    def finish(self) -> str:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return str(self.hasher.hexdigest())


class ImageHasher:
    """Feeds the raw image, in order, to the chosen digests."""

    def __init__(self, *, full: bool = True, sparse: bool = False) -> None:
        self._threads = {name: _HashThread(name) for name in ("md5", "sha512")} if full else {}
        self._sparse = hashlib.sha256() if sparse else None
        self.size = 0

    def data(self, offset: int, data: bytes) -> None:
        """Bytes at `offset` (which must continue where the last call ended)."""
        assert offset == self.size, "the image must be hashed in order"
        for thread in self._threads.values():
            thread.put(data)
        if self._sparse is not None:
            view = memoryview(data)
            zero_block = memoryview(ZERO_PIECE)
            # Blocks are aligned to the image, so data must arrive aligned.
            for start in range(0, len(data), SPARSE_BLOCK):
                block = view[start : start + SPARSE_BLOCK]
                if block != zero_block[: len(block)]:
                    self._sparse.update((offset + start).to_bytes(8, "big"))
                    self._sparse.update(block)
        self.size += len(data)

    def zeros(self, offset: int, length: int) -> None:
        assert offset == self.size, "the image must be hashed in order"
        if length:
            for thread in self._threads.values():
                thread.put(length)
        self.size += length

    def finish(self) -> Checksums:
        digests = {name: thread.finish() for name, thread in self._threads.items()}
        sparse = None
        if self._sparse is not None:
            self._sparse.update(self.size.to_bytes(8, "big"))
            sparse = self._sparse.hexdigest()
        return Checksums(size=self.size, md5=digests.get("md5"), sha512=digests.get("sha512"), sparse=sparse)


def data_ranges(extents: Iterable[Extent], size: int) -> list[tuple[int, int]]:
    """The ranges to read: data extents widened to whole SPARSE_BLOCKs (so
    the sparse digest sees aligned blocks) and merged; the rest is zeros."""
    ranges: list[tuple[int, int]] = []
    for offset, length, has_data in sorted(extents):
        if not has_data or length <= 0:
            continue
        start = offset - offset % SPARSE_BLOCK
        end = min(size, -(-(offset + length) // SPARSE_BLOCK) * SPARSE_BLOCK)
        if ranges and start <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], end))
        elif end > start:
            ranges.append((start, end))
    return ranges


def _pieces(ranges: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    for start, end in ranges:
        for offset in range(start, end, READ_PIECE):
            yield offset, min(READ_PIECE, end - offset)


def _read_ahead(
    read_at: Callable[[int, int], bytes], pieces: Iterable[tuple[int, int]], depth: int = READ_AHEAD
) -> Iterator[tuple[int, int, bytes]]:
    """(offset, length, data) in order, the next `depth` pieces being read on
    a thread while the caller hashes this one: librbd reads and pread drop
    the GIL, so reading and hashing overlap instead of adding up."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="read-ahead")
    pending: deque[tuple[int, int, Future[bytes]]] = deque()
    try:
        for offset, length in pieces:
            pending.append((offset, length, pool.submit(read_at, offset, length)))
            if len(pending) > depth:
                first, size, future = pending.popleft()
                yield first, size, future.result()
        while pending:
            first, size, future = pending.popleft()
            yield first, size, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def hash_image(
    size: int,
    extents: Iterable[Extent],
    read_at: Callable[[int, int], bytes],
    *,
    full: bool = True,
    sparse: bool = False,
    progress: Callable[[int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> Checksums:
    """Hash a stored raw image of `size` bytes given its extents (offset,
    length, holds-data). Gaps between extents and extents without data are
    hashed as zeros without being read."""
    hasher = ImageHasher(full=full, sparse=sparse)
    position = 0
    try:
        for offset, length, data in _read_ahead(read_at, _pieces(data_ranges(extents, size))):
            if cancelled is not None and cancelled():
                raise InterruptedError("hashing cancelled")
            if len(data) != length:
                raise OSError(f"short read at {offset}: {len(data)} of {length} bytes")
            hasher.zeros(position, offset - position)
            hasher.data(offset, data)
            position = offset + length
            if progress is not None:
                progress(position)
        hasher.zeros(position, size - position)
    finally:
        result = hasher.finish()
    return result
