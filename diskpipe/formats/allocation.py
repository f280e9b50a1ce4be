"""Counting allocated guest bytes from allocation tables, with numpy.

numpy is imported here only, lazily, so `import diskpipe.formats` and the
default `diskpipe info` path never pay for it. Tables are read in pieces of
at most `TABLE_PIECE` bytes, so memory stays bounded whatever their size.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

    import numpy as np

TABLE_PIECE = 1024 * 1024


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
