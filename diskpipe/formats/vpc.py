"""VHD (`format: vpc`): dynamic and differencing disks by their footer copy at
offset 0, fixed disks by their footer at the end. docs/formats.md §3.

qemu's probe misses fixed VHDs (it looks at offset 0 only); diskpipe finds
them by the footer at the end and sizes them as `qemu-img info -f vpc` does.
"""

from __future__ import annotations

from diskpipe.formats import allocation
from diskpipe.formats.base import ContainerFormat, InspectOptions, read_exact
from diskpipe.formats.errors import FormatError
from diskpipe.formats.info import Facts
from diskpipe.formats.layout import Layout
from diskpipe.formats.reads import Read, Request

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from collections.abc import Generator
    from typing import Any

    from diskpipe.formats.base import Inspection

NAME = "vpc"
COOKIE = b"conectix"
DYNAMIC_COOKIE = b"cxsparse"
FOOTER = Layout(NAME, "footer", ">", """
    0   8s   cookie
    8   I    features
    12  I    version
    16  Q    data_offset
    24  I    timestamp
    28  4s   creator_app
    32  I    creator_version
    36  4s   creator_os
    40  Q    original_size
    48  Q    current_size
    56  H    cylinders
    58  B    heads
    59  B    sectors_per_track
    60  I    disk_type
    64  I    checksum
    68  16s  unique_id
    84  B    saved_state
    85  427x reserved
""")  # fmt: skip
FOOTER_SIZE = FOOTER.size  # 512
DYNAMIC_HEADER = Layout(NAME, "dynamic disk header", ">", """
    0   8s    cookie
    8   Q     data_offset
    16  Q     table_offset
    24  I     version
    28  I     max_table_entries
    32  I     block_size
    36  I     checksum
    40  16s   parent_uuid
    56  I     parent_timestamp
    60  4x    reserved
    64  512s  parent_name
""")  # fmt: skip
DYNAMIC_HEADER_SIZE = 1024
PARENT_LOCATOR = Layout(NAME, "parent locator", ">", """
    0   4s  platform_code
    4   I   data_space
    8   I   data_length
    12  4x  reserved
    16  Q   data_offset
""")  # fmt: skip
PARENT_LOCATORS_OFFSET = 576
PARENT_LOCATOR_COUNT = 8
DISK_FIXED, DISK_DYNAMIC, DISK_DIFFERENCING = 2, 3, 4
DISK_TYPE_NAMES = {DISK_FIXED: "fixed", DISK_DYNAMIC: "dynamic", DISK_DIFFERENCING: "differencing"}
# qemu 7.2 sizes by current_size for these creators; by CHS geometry otherwise.
CURRENT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")
MAX_GEOMETRY_SECTORS = 65535 * 16 * 255
MAX_SECTORS = 0xFF000000  # "File too large": qemu's 2040 GiB limit
UNALLOCATED = 0xFFFFFFFF


def probe(buffer: bytes) -> bool:
    return buffer[:8] == COOKIE


def checksum(footer: bytes) -> int:
    """Ones' complement of the byte sum, with the checksum field counted as zero."""
    return ~(sum(footer[:64]) + sum(footer[68:FOOTER_SIZE])) & 0xFFFFFFFF


def parse_footer(raw: bytes, where: int) -> dict[str, Any]:
    footer = FOOTER.parse(raw, file_offset=where)
    if footer["cookie"] != COOKIE:
        raise FormatError(NAME, "footer cookie missing", offset=where)
    if checksum(raw[:FOOTER_SIZE]) != footer["checksum"]:
        raise FormatError(NAME, "incorrect header checksum", field="checksum", offset=where + 64)
    return footer


def fixed_footer(tail: bytes) -> dict[str, Any] | None:
    """The footer of a fixed disk in the last 512 bytes, if they hold a
    valid one (what `-f vpc` accepts when offset 0 has no cookie). The
    parsed footer is handed on to `fixed_facts`: parsing and checksumming
    it twice cost a fixed VHD more than the rest of its facts."""
    if len(tail) < FOOTER_SIZE:
        return None
    raw = tail[-FOOTER_SIZE:]
    if raw[:8] != COOKIE:
        return None
    footer = FOOTER.parse(raw)
    if footer["disk_type"] == DISK_FIXED and checksum(raw) == footer["checksum"]:
        return footer
    return None


def size_facts(footer: dict[str, Any]) -> dict[str, Any]:
    """Virtual size as qemu 7.2 computes it, with both candidate sizes."""
    chs_sectors = footer["cylinders"] * footer["heads"] * footer["sectors_per_track"]
    current_size = footer["current_size"]
    use_current = footer["creator_app"] in CURRENT_SIZE_CREATORS or chs_sectors == MAX_GEOMETRY_SECTORS
    sectors = current_size // 512 if use_current else chs_sectors
    if sectors > MAX_SECTORS:
        raise FormatError(NAME, f"file too large ({sectors} sectors; qemu's limit is 2040 GiB)", offset=48)
    return {
        "virtual_size": sectors * 512,
        "size-source": "current_size" if use_current else "chs",
        "footer-current-size": current_size,
        "chs-size": chs_sectors * 512,
        "creator-app": footer["creator_app"].decode("latin-1"),
        "geometry": [footer["cylinders"], footer["heads"], footer["sectors_per_track"]],
    }


def fixed_facts(tail: bytes, file_size: int, footer: dict[str, Any] | None = None) -> Facts:
    """Facts of a fixed VHD found by its footer at the end (`footer`: the
    one `fixed_footer` already parsed from this tail)."""
    if footer is None:
        footer = parse_footer(tail[-FOOTER_SIZE:], file_size - FOOTER_SIZE)
    sizes = size_facts(footer)
    virtual_size = sizes.pop("virtual_size")
    return Facts(
        format=NAME,
        virtual_size=virtual_size,
        subformat="fixed",
        details={"disk-type": "fixed", "data-size": file_size - FOOTER_SIZE, **sizes},
    )


def inspect(head: bytes, options: InspectOptions) -> Inspection:
    # A cookie at offset 0 makes qemu treat the disk as dynamic, whatever the type says.
    footer = parse_footer(head[:FOOTER_SIZE], 0)
    sizes = size_facts(footer)
    virtual_size = sizes.pop("virtual_size")
    disk_type = footer["disk_type"]
    header_offset = footer["data_offset"]
    raw_header = yield from read_exact(header_offset, DYNAMIC_HEADER_SIZE, head)
    if len(raw_header) < DYNAMIC_HEADER_SIZE or raw_header[:8] != DYNAMIC_COOKIE:
        raise FormatError(NAME, "error reading dynamic VHD header", offset=header_offset)
    header = DYNAMIC_HEADER.parse(raw_header)
    block_size = header["block_size"]
    _check_dynamic_header(header, virtual_size, header_offset)
    anomalies: list[dict[str, str]] = []
    details: dict[str, Any] = {
        "disk-type": DISK_TYPE_NAMES.get(disk_type, str(disk_type)),
        "block-size": block_size,
        "anomalies": anomalies,
        **sizes,
    }
    locators = _parent_locators(raw_header)
    if disk_type == DISK_DIFFERENCING or locators or any(header["parent_uuid"]):
        details["parent"] = {
            "name": header["parent_name"].decode("utf-16-be", "replace").rstrip("\0"),
            "uuid": header["parent_uuid"].hex(),
            "locators": locators,
        }

    allocated = None
    if options.allocation:
        allocated = yield from allocation.counted_within_file(
            _count_allocation(header, virtual_size),
            anomalies,
            "free_data_block_offset points after the end of file: the image has been truncated",
        )
    return Facts(
        format=NAME,
        virtual_size=virtual_size,
        cluster_size=block_size,
        subformat=details["disk-type"],
        details=details,
        allocated_size=allocated,
    )


def _check_dynamic_header(header: dict[str, Any], virtual_size: int, header_offset: int) -> None:
    """qemu's refusals of a dynamic disk header."""
    block_size = header["block_size"]
    if block_size < 512 or block_size & (block_size - 1):
        raise FormatError(NAME, f"invalid block size {block_size}", field="block_size", offset=header_offset + 32)
    if virtual_size // block_size > 0xFFFFFFFF:
        raise FormatError(NAME, "too many blocks", offset=header_offset + 32)
    max_entries = header["max_table_entries"]
    if max_entries * block_size < virtual_size:
        raise FormatError(NAME, "page table too small", field="max_table_entries", offset=header_offset + 28)
    if max_entries > 0x7FFFFFFF // 4:
        raise FormatError(NAME, f"max table entries too large ({max_entries})", offset=header_offset + 28)


def _parent_locators(raw_header: bytes) -> list[dict[str, Any]]:
    locators = []
    for index in range(PARENT_LOCATOR_COUNT):
        entry = PARENT_LOCATOR.parse(raw_header, PARENT_LOCATORS_OFFSET + index * 24)
        if entry["platform_code"] != b"\0\0\0\0" or entry["data_length"] or entry["data_offset"]:
            locators.append(
                {
                    "platform": entry["platform_code"].decode("latin-1"),
                    "length": entry["data_length"],
                    "offset": entry["data_offset"],
                }
            )
    return locators


def _count_allocation(header: dict[str, Any], virtual_size: int) -> Generator[Request, Any, tuple[int, int]]:
    """(guest bytes in allocated blocks, end of the furthest block) from the BAT.

    qemu reports an allocated block as data as a whole, so this counts whole
    blocks, cut at the disk's end.
    """
    np = allocation.numpy()
    block_size = header["block_size"]
    bitmap_size = (block_size // (8 * 512) + 511) & ~511
    table_offset = header["table_offset"]
    table_bytes = header["max_table_entries"] * 4
    total = 0
    data_end = (table_offset + table_bytes + 511) // 512 * 512
    for first_index, piece_offset, piece_length in allocation.table_pieces(table_offset, table_bytes, 4):
        piece: bytes = yield Read(piece_offset, piece_length)
        if not piece:
            break  # past the end of the data: the rest of the table reads as zeros
        entries = np.frombuffer(piece.ljust(piece_length, b"\xff"), dtype=">u4")
        allocated = np.nonzero(entries != UNALLOCATED)[0]
        if allocated.size:
            furthest = int(entries[allocated].max()) * 512 + bitmap_size + block_size
            data_end = max(data_end, furthest)
            total += allocation.clip_to_size(allocated.astype(np.int64) + first_index, block_size, virtual_size)
    return total, data_end


FORMAT = ContainerFormat(NAME, probe, inspect)
