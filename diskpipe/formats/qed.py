"""QED, the QEMU Enhanced Disk format: docs/formats.md §2, qemu docs/interop/qed_spec.rst."""

from __future__ import annotations

from diskpipe.formats import allocation
from diskpipe.formats.base import ContainerFormat, InspectOptions, read_exact
from diskpipe.formats.errors import FormatError, Unavailable
from diskpipe.formats.info import Facts
from diskpipe.formats.layout import Layout, c_string
from diskpipe.formats.reads import MAX_READ, GetSize, Read, Request

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from collections.abc import Generator
    from typing import Any

    from diskpipe.formats.base import Inspection

NAME = "qed"
MAGIC = b"QED\0"
HEADER = Layout(NAME, "header", "<", """
    0   4s  magic
    4   I   cluster_size
    8   I   table_size
    12  I   header_size
    16  Q   features
    24  Q   compat_features
    32  Q   autoclear_features
    40  Q   l1_table_offset
    48  Q   image_size
    56  I   backing_filename_offset
    60  I   backing_filename_size
""")  # fmt: skip
FEATURE_BACKING_FILE = 1 << 0
FEATURE_NEED_CHECK = 1 << 1
FEATURE_BACKING_RAW = 1 << 2
FEATURES_KNOWN = 0x7
MAX_BACKING_NAME = 4095  # qemu reads the name into a PATH_MAX buffer
UNALLOCATED = 0
ZERO_CLUSTER = 1


def probe(buffer: bytes) -> bool:
    return buffer[:4] == MAGIC


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def inspect(head: bytes, options: InspectOptions) -> Inspection:
    header = HEADER.parse(head)
    cluster_size = header["cluster_size"]
    table_size = header["table_size"]
    image_size = header["image_size"]
    anomalies: list[dict[str, str]] = []
    details: dict[str, Any] = {"features": header["features"], "anomalies": anomalies}
    unknown = header["features"] & ~FEATURES_KNOWN
    if unknown:
        details["unknown-features"] = unknown
    if not (_power_of_two(cluster_size) and 4096 <= cluster_size <= 64 * 1024 * 1024):
        raise FormatError(NAME, f"invalid cluster size {cluster_size}", field="cluster_size", offset=4)
    if not (_power_of_two(table_size) and table_size <= 16):
        raise FormatError(NAME, f"invalid table size {table_size}", field="table_size", offset=8)
    table_entries = table_size * cluster_size // 8
    if image_size % 512 or image_size > table_entries * table_entries * cluster_size:
        raise FormatError(NAME, f"QED image size {image_size} is invalid", field="image_size", offset=48)
    header_bytes = header["header_size"] * cluster_size
    if header_bytes > 0xFFFFFFFF:
        raise FormatError(NAME, "header size overflows", field="header_size", offset=12)

    backing_file = backing_format = None
    if header["features"] & FEATURE_BACKING_FILE:
        name_offset, name_size = header["backing_filename_offset"], header["backing_filename_size"]
        if name_offset + name_size > header_bytes or name_size > MAX_BACKING_NAME:
            raise FormatError(NAME, "backing file name lies outside the header", offset=56)
        backing_file = c_string((yield from read_exact(name_offset, name_size, head)))
        if header["features"] & FEATURE_BACKING_RAW:
            backing_format = "raw"

    allocated = None
    # Tables above MAX_READ (clusters x table_size > 1 MiB; qemu's default is
    # 256 KiB) are not counted: reading them would break the memory bound.
    if options.allocation and table_entries * 8 <= MAX_READ:
        try:
            allocated = yield from _count_allocation(header, table_entries)
        except Unavailable:
            allocated = None
    # The size comes last: a stream knows it only at its end.
    file_size: int = yield GetSize()
    _check_table_offset(header["l1_table_offset"], cluster_size, table_size, header_bytes, file_size)
    return Facts(
        format=NAME,
        virtual_size=image_size,
        cluster_size=cluster_size,
        backing_file=backing_file,
        backing_file_format=backing_format,
        dirty=bool(header["features"] & FEATURE_NEED_CHECK),
        details=details,
        allocated_size=allocated,
    )


def _check_table_offset(offset: int, cluster_size: int, table_size: int, header_bytes: int, file_size: int) -> None:
    """qemu's test: the table's first and last clusters lie after the header
    and before the end of the file (rounded down to a cluster)."""
    usable_end = file_size // cluster_size * cluster_size

    def valid_cluster(position: int) -> bool:
        return position % cluster_size == 0 and header_bytes <= position < usable_end

    end_offset = offset + (table_size - 1) * cluster_size
    # A one-cluster table fails qemu's `end_offset <= offset` overflow test.
    if end_offset <= offset or not (valid_cluster(offset) and valid_cluster(end_offset)):
        raise FormatError(NAME, "QED table offset is invalid", field="l1_table_offset", offset=40)


def _count_allocation(header: dict[str, Any], table_entries: int) -> Generator[Request, Any, int]:
    """Guest bytes with data: L2 entries other than unallocated (0) and zero (1)."""
    np = allocation.numpy()
    cluster_size = header["cluster_size"]
    table_bytes = table_entries * 8
    l1: bytes = yield Read(header["l1_table_offset"], table_bytes)
    l1_entries = np.frombuffer(l1[: len(l1) // 8 * 8], dtype="<u8")
    present = np.nonzero(l1_entries)[0]
    offsets = l1_entries[present]
    if np.unique(offsets).size != offsets.size or bool((offsets % np.uint64(cluster_size)).any()):
        return 0  # shared or misaligned tables: qemu's check would fail; nothing counted
    total = 0
    for l1_index, l2_offset in zip(
        present[np.argsort(offsets, kind="stable")].tolist(), np.sort(offsets).tolist(), strict=True
    ):
        table: bytes = yield Read(l2_offset, table_bytes)
        if not table:
            break  # past the end, as are the later (higher) tables: no data, only CPU to burn
        entries = np.frombuffer(table.ljust(table_bytes, b"\0"), dtype="<u8")
        units = np.nonzero(entries > ZERO_CLUSTER)[0].astype(np.int64) + l1_index * table_entries
        total += allocation.clip_to_size(units, cluster_size, header["image_size"])
    return total


FORMAT = ContainerFormat(NAME, probe, inspect)
