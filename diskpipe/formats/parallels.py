"""Parallels / Virtuozzo (`format: parallels`, Glance's `ploop`). docs/formats.md §12;
qemu docs/interop/parallels.txt."""

from __future__ import annotations

from diskpipe.formats import allocation
from diskpipe.formats.base import ContainerFormat, InspectOptions
from diskpipe.formats.errors import FormatError, Unavailable
from diskpipe.formats.info import Facts
from diskpipe.formats.layout import Layout
from diskpipe.formats.reads import GetSize, Read, Request

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from collections.abc import Generator
    from typing import Any

    from diskpipe.formats.base import Inspection

NAME = "parallels"
MAGIC_OLD = b"WithoutFreeSpace"
MAGIC_EXT = b"WithouFreSpacExt"
VERSION = 2
HEADER = Layout(NAME, "header", "<", """
    0   16s  magic
    16  I    version
    20  I    heads
    24  I    cylinders
    28  I    tracks
    32  I    bat_entries
    36  Q    nb_sectors
    44  I    inuse
    48  I    data_off
    52  I    flags
    56  Q    ext_off
""")  # fmt: skip
HEADER_SIZE = HEADER.size  # 64
INUSE_MAGIC = 0x746F6E59  # "Ynot": the image was not closed cleanly


def probe(buffer: bytes) -> bool:
    return buffer[:16] in (MAGIC_OLD, MAGIC_EXT) and int.from_bytes(buffer[16:20], "little") == VERSION


def inspect(head: bytes, options: InspectOptions) -> Inspection:
    header = HEADER.parse(head)
    sectors = header["nb_sectors"]
    if header["magic"] == MAGIC_OLD:
        sectors &= 0xFFFFFFFF  # the old format keeps a 32-bit sector count
    if header["tracks"] == 0:
        raise FormatError(NAME, "invalid image: zero sectors per track", field="tracks", offset=28)
    if header["tracks"] > 0x7FFFFFFF // 513:
        raise FormatError(NAME, "invalid image: too big cluster", field="tracks", offset=28)
    if header["bat_entries"] > 0x7FFFFFFF // 4:
        raise FormatError(NAME, "catalog too large", field="bat_entries", offset=32)
    cluster_bytes = header["tracks"] * 512
    # BAT entries count sectors (old format) or clusters (ext format).
    entry_unit = 512 if header["magic"] == MAGIC_OLD else cluster_bytes
    allocated = None
    data_end = 0
    anomalies: list[dict[str, str]] = []
    if options.allocation:
        try:
            allocated, data_end = yield from _count_allocation(
                header["bat_entries"], entry_unit, cluster_bytes, sectors * 512
            )
        except Unavailable:
            allocated = None
    file_size: int = yield GetSize()
    if data_end > file_size:
        anomalies.append({"name": "allocation_past_eof", "message": "the BAT points past the end of the file"})
    return Facts(
        format=NAME,
        virtual_size=sectors * 512,
        allocated_size=allocated,
        dirty=None,  # qemu reports no dirty-flag for parallels
        subformat="ext" if header["magic"] == MAGIC_EXT else "old",
        details={
            "cluster-bytes": header["tracks"] * 512,
            "unclean": header["inuse"] == INUSE_MAGIC,
            "file-size": file_size,
            "anomalies": anomalies,
        },
    )


def _count_allocation(
    bat_entries: int, entry_unit: int, cluster_bytes: int, virtual_size: int
) -> Generator[Request, Any, tuple[int, int]]:
    """(guest bytes in allocated clusters, end of the furthest one) from the
    BAT right after the 64-byte header; a zero entry is unallocated."""
    np = allocation.numpy()
    total = 0
    data_end = 0
    for first_index, piece_offset, piece_length in allocation.table_pieces(HEADER_SIZE, bat_entries * 4, 4):
        piece: bytes = yield Read(piece_offset, piece_length)
        if not piece:
            break  # past the end of the data: the rest of the table reads as zeros
        entries = np.frombuffer(piece.ljust(piece_length, b"\0"), dtype="<u4")
        present = np.nonzero(entries)[0]
        if present.size:
            data_end = max(data_end, int(entries[present].max()) * entry_unit + cluster_bytes)
            total += allocation.clip_to_size(present.astype(np.int64) + first_index, cluster_bytes, virtual_size)
    return total, data_end


FORMAT = ContainerFormat(NAME, probe, inspect)
