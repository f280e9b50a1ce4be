"""Counting allocated guest bytes from allocation tables, with numpy.

numpy is imported here only, lazily, so `import diskpipe.formats` and the
default `diskpipe info` path never pay for it. Tables are read in pieces of
at most `TABLE_PIECE` bytes, so memory stays bounded whatever their size.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

from diskpipe.formats.reads import Read, Request

if TYPE_CHECKING:
    import numpy as np

TABLE_PIECE = 1024 * 1024
# At most this many second-level table offsets are held (and sorted) at once.
OFFSET_BATCH = TABLE_PIECE // 8


def numpy() -> Any:
    import numpy as np  # deliberately lazy: numpy costs ~100 ms at import

    return np


def table_pieces(offset: int, length: int, entry_size: int) -> Iterator[tuple[int, int, int]]:
    """(first entry index, byte offset, byte length) of each piece of a table."""
    piece = TABLE_PIECE - TABLE_PIECE % entry_size
    done = 0
    while done < length:
        size = min(piece, length - done)
        yield done // entry_size, offset + done, size
        done += size


def for_each_piece(
    offset: int,
    length: int,
    entry_size: int,
    dtype: str,
    visit: Callable[[int, np.ndarray], None],
) -> Generator[Request, Any, bool]:
    """Read a table in bounded pieces and call `visit(first_index, entries)`.

    Returns False when the table ends early (cut off by the end of the file):
    the missing entries read as zero, as qemu reads them.
    """
    np = numpy()
    complete = True
    for first_index, piece_offset, piece_length in table_pieces(offset, length, entry_size):
        data: bytes = yield Read(piece_offset, piece_length)
        if len(data) < piece_length:
            complete = False
            data = data + bytes(piece_length - len(data))
        visit(first_index, np.frombuffer(data, dtype=dtype))
    return complete


def sorted_batches(indexes: np.ndarray, offsets: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Second-level tables in ascending file order, at most OFFSET_BATCH at a time.

    Ascending order lets a stream answer the reads as it passes the tables.
    """
    np = numpy()
    order = np.argsort(offsets, kind="stable")
    for start in range(0, len(order), OFFSET_BATCH):
        chosen = order[start : start + OFFSET_BATCH]
        yield indexes[chosen], offsets[chosen]


def clip_to_size(allocated_units: np.ndarray, unit_size: int, virtual_size: int) -> int:
    """Bytes of the allocated units (by guest index), the last one cut at the disk's end."""
    np = numpy()
    if unit_size <= 0 or virtual_size <= 0:
        return 0
    last_unit = (virtual_size - 1) // unit_size
    units = allocated_units[allocated_units <= last_unit]
    total = int(units.size) * unit_size
    if units.size and bool(np.any(units == last_unit)):
        total -= (last_unit + 1) * unit_size - virtual_size
    return total
