"""qcow version 1 (`format: qcow`): old, still opened by qemu, refused by policy.

docs/formats.md §1.5; qemu block/qcow.c.
"""

from __future__ import annotations

from diskpipe.formats import allocation
from diskpipe.formats.base import ContainerFormat, InspectOptions, read_exact
from diskpipe.formats.errors import Unavailable
from diskpipe.formats.info import Facts
from diskpipe.formats.layout import Layout, c_string
from diskpipe.formats.reads import Read, Request

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from collections.abc import Generator
    from typing import Any

    from diskpipe.formats.base import Inspection

NAME = "qcow"
MAGIC = b"QFI\xfb"
HEADER = Layout(NAME, "header", ">", """
    0   4s  magic
    4   I   version
    8   Q   backing_file_offset
    16  I   backing_file_size
    20  I   mtime
    24  Q   size
    32  B   cluster_bits
    33  B   l2_bits
    34  2x  padding
    36  I   crypt_method
    40  Q   l1_table_offset
""")  # fmt: skip
MAX_BACKING_NAME = 1023


def probe(buffer: bytes) -> bool:
    return buffer[:4] == MAGIC and int.from_bytes(buffer[4:8], "big") == 1


def inspect(head: bytes, options: InspectOptions) -> Inspection:
    header = HEADER.parse(head)
    anomalies: list[dict[str, str]] = []
    details: dict[str, Any] = {"version": 1, "anomalies": anomalies}
    cluster_bits = header["cluster_bits"]
    if not 9 <= cluster_bits <= 16:
        anomalies.append({"name": "cluster_size", "message": "cluster size must be between 512 and 64k"})
    if not 6 <= header["l2_bits"] <= 13:
        anomalies.append({"name": "l2_size", "message": "L2 table size must be between 512 and 64k"})
    if header["crypt_method"] > 1:
        anomalies.append({"name": "crypt_method", "message": f"invalid encryption method {header['crypt_method']}"})
    backing_file = None
    if header["backing_file_offset"] and header["backing_file_size"]:
        size = header["backing_file_size"]
        if size > MAX_BACKING_NAME:
            anomalies.append({"name": "backing_file_name", "message": "backing file name too long"})
        raw = yield from read_exact(header["backing_file_offset"], min(size, MAX_BACKING_NAME + 1), head)
        backing_file = c_string(raw)
    virtual_size = header["size"] // 512 * 512
    allocated = None
    if options.allocation and 9 <= cluster_bits <= 16 and 6 <= header["l2_bits"] <= 13:
        try:
            allocated = yield from _count_allocation(header, virtual_size)
        except Unavailable:
            allocated = None
    return Facts(
        format=NAME,
        virtual_size=virtual_size,
        allocated_size=allocated,
        cluster_size=1 << cluster_bits if 9 <= cluster_bits <= 16 else None,
        backing_file=backing_file,
        encrypted=header["crypt_method"] != 0,
        subformat="qcow1",
        details=details,
    )


def _count_allocation(header: dict[str, Any], virtual_size: int) -> Generator[Request, Any, int]:
    """Guest bytes in allocated clusters: L1 -> L2 tables of u64 offsets,
    any non-zero entry (compressed ones too) holds data."""
    np = allocation.numpy()
    cluster_bits, l2_bits = header["cluster_bits"], header["l2_bits"]
    l2_entries = 1 << l2_bits
    l1_size = -(-virtual_size // (1 << (cluster_bits + l2_bits)))
    total = 0
    for first_index, piece_offset, piece_length in allocation.table_pieces(header["l1_table_offset"], l1_size * 8, 8):
        piece: bytes = yield Read(piece_offset, piece_length)
        if not piece:
            break  # past the end of the data: the rest of the table reads as zeros
        l1 = np.frombuffer(piece.ljust(piece_length, b"\0"), dtype=">u8")
        present = np.nonzero(l1)[0]
        offsets = l1[present]
        # Shared or overlapping tables (qcow offsets need no alignment) would
        # have the scan re-read the same bytes once per entry: not counted.
        if offsets.size > 1 and int(np.diff(np.sort(offsets)).min()) < l2_entries * 8:
            return total
        for l1_index, l2_offset in zip(
            (present[np.argsort(offsets)] + first_index).tolist(), np.sort(offsets).tolist(), strict=True
        ):
            table: bytes = yield Read(l2_offset, l2_entries * 8)
            if not table:
                break  # past the end, as are the later (higher) tables: no data
            entries = np.frombuffer(table.ljust(l2_entries * 8, b"\0"), dtype=">u8")
            units = np.nonzero(entries)[0].astype(np.int64) + l1_index * l2_entries
            total += allocation.clip_to_size(units, 1 << cluster_bits, virtual_size)
    return total


FORMAT = ContainerFormat(NAME, probe, inspect)
