"""Counting allocated guest bytes from allocation tables, with numpy.

numpy is imported here only, lazily, so `import diskpipe.formats` and the
default `diskpipe info` path never pay for it. Tables are read in pieces of
at most `TABLE_PIECE` bytes, so memory stays bounded whatever their size.
"""

from __future__ import annotations

from diskpipe.formats.errors import Unavailable
from diskpipe.formats.reads import GetSize

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from collections.abc import Generator, Iterator
    from typing import Any

    import numpy as np

    from diskpipe.formats.reads import Request

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


def counted_within_file(
    counting: Generator[Request, Any, tuple[int, int]], anomalies: list[dict[str, str]], past_end: str
) -> Generator[Request, Any, int | None]:
    """Run a block map's count (guest bytes allocated, end of the furthest
    data block); None when the map cannot be read. Data past the end of the
    file is an anomaly (`past_end` says it in the format's terms): a
    truncated image. The file size is asked last: a stream knows it only at
    its end, after the tables."""
    try:
        allocated, data_end = yield from counting
    except Unavailable:
        return None
    file_size: int = yield GetSize()
    if data_end > file_size:
        anomalies.append({"name": "allocation_past_eof", "message": past_end})
    return allocated
