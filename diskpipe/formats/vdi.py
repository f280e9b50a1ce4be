"""VDI (VirtualBox): docs/formats.md §5, VirtualBox VDICore.h."""

from __future__ import annotations

from diskpipe.formats import allocation
from diskpipe.formats.base import ContainerFormat, InspectOptions
from diskpipe.formats.errors import FormatError
from diskpipe.formats.info import Facts
from diskpipe.formats.layout import Layout, round_up
from diskpipe.formats.reads import Read, Request

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from collections.abc import Generator
    from typing import Any

    from diskpipe.formats.base import Inspection

NAME = "vdi"
SIGNATURE = 0xBEDA107F
VERSION_1_1 = 0x00010001
PRE_HEADER = Layout(NAME, "pre-header", "<", "0x40 I signature, 0x44 I version")
SIGNATURE_OFFSET = PRE_HEADER.start
HEADER_V1 = Layout(NAME, "header", "<", """
    0x48   I     header_size
    0x4C   I     image_type
    0x50   I     flags
    0x54   256x  comment
    0x154  I     offset_bmap
    0x158  I     offset_data
    0x15C  I     cylinders
    0x160  I     heads
    0x164  I     sectors
    0x168  I     sector_size
    0x16C  4x    unused_translation
    0x170  Q     disk_size
    0x178  I     block_size
    0x17C  I     block_extra
    0x180  I     blocks_in_image
    0x184  I     blocks_allocated
    0x188  16s   uuid_image
    0x198  16s   uuid_last_snap
    0x1A8  16s   uuid_link
    0x1B8  16s   uuid_parent
""")  # fmt: skip
# Version 0.x keeps a shorter body after the 72-byte pre-header.
HEADER_V0 = Layout(NAME, "version 0 header", "<", """
    72   I     image_type
    76   276x  flags_comment_geometry
    352  Q     disk_size
    360  I     block_size
    364  I     blocks_in_image
""")  # fmt: skip
BLOCK_SIZE = 1024 * 1024
BLOCKS_IN_IMAGE_MAX = 0x7FFFFFFF // 4 // 512 * 512  # keeps the block map below 2 GiB
FIRST_UNALLOCATED = 0xFFFFFFFE  # 0xFFFFFFFE discarded (reads zero), 0xFFFFFFFF free
IMAGE_TYPES = {1: "dynamic", 2: "static", 3: "undo", 4: "differencing"}


def probe(buffer: bytes) -> bool:
    return int.from_bytes(buffer[SIGNATURE_OFFSET : SIGNATURE_OFFSET + 4], "little") == SIGNATURE


def inspect(head: bytes, options: InspectOptions) -> Inspection:
    pre = PRE_HEADER.parse(head)
    version = pre["version"]
    anomalies: list[dict[str, str]] = []
    details: dict[str, Any] = {"version": f"{version >> 16}.{version & 0xFFFF}", "anomalies": anomalies}
    if version != VERSION_1_1:
        anomalies.append(
            {
                "name": "unsupported_version",
                "message": f"unsupported VDI image (version {version >> 16}.{version & 0xFFFF})",
            }
        )
        if version >> 16 == 0:
            old = HEADER_V0.parse(head)
            return Facts(
                format=NAME,
                virtual_size=round_up(old["disk_size"], 512),
                subformat=IMAGE_TYPES.get(old["image_type"], str(old["image_type"])),
                details=details,
            )
    header = HEADER_V1.parse(head)
    _check_header(header)
    if any(header["uuid_link"]) or any(header["uuid_parent"]):
        # qemu refuses these too; they name a parent image (a differencing disk).
        details["parent"] = {"uuid-link": header["uuid_link"].hex(), "uuid-parent": header["uuid_parent"].hex()}
    virtual_size = round_up(header["disk_size"], 512)
    details["image-type"] = IMAGE_TYPES.get(header["image_type"], str(header["image_type"]))

    allocated = None
    if options.allocation:
        allocated = yield from allocation.counted_within_file(
            _count_allocation(header, virtual_size), anomalies, "the block map points past the end of the file"
        )
    return Facts(
        format=NAME,
        virtual_size=virtual_size,
        cluster_size=BLOCK_SIZE,
        subformat=details["image-type"],
        details=details,
        allocated_size=allocated,
    )


def _check_header(header: dict[str, Any]) -> None:
    """qemu's refusals of a version 1.1 header."""
    for field, label in (("offset_bmap", "block map offset"), ("offset_data", "data offset")):
        if header[field] % 512:
            raise FormatError(NAME, f"unsupported VDI image (unaligned {label} 0x{header[field]:x})", field=field)
    if header["sector_size"] != 512:
        raise FormatError(
            NAME, f"unsupported VDI image (sector size {header['sector_size']} is not 512)", field="sector_size"
        )
    if header["block_size"] != BLOCK_SIZE:
        raise FormatError(
            NAME, f"unsupported VDI image (block size {header['block_size']} is not {BLOCK_SIZE})", field="block_size"
        )
    blocks = header["blocks_in_image"]
    if blocks > BLOCKS_IN_IMAGE_MAX:
        raise FormatError(
            NAME,
            f"unsupported VDI image (too many blocks {blocks}, max is {BLOCKS_IN_IMAGE_MAX})",
            field="blocks_in_image",
        )
    if header["disk_size"] > blocks * BLOCK_SIZE:
        raise FormatError(
            NAME,
            f"unsupported VDI image (disk size {header['disk_size']}, image bitmap has room for {blocks * BLOCK_SIZE})",
            field="disk_size",
        )


def _count_allocation(header: dict[str, Any], virtual_size: int) -> Generator[Request, Any, tuple[int, int]]:
    """(guest bytes in allocated blocks, end of the furthest data block)."""
    np = allocation.numpy()
    total = 0
    furthest = -1
    table_bytes = header["blocks_in_image"] * 4
    for first_index, piece_offset, piece_length in allocation.table_pieces(header["offset_bmap"], table_bytes, 4):
        piece: bytes = yield Read(piece_offset, piece_length)
        if not piece:
            break  # past the end of the data: the rest of the table reads as zeros
        entries = np.frombuffer(piece.ljust(piece_length, b"\xff"), dtype="<u4")
        allocated = np.nonzero(entries < FIRST_UNALLOCATED)[0]
        if allocated.size:
            furthest = max(furthest, int(entries[allocated].max()))
            total += allocation.clip_to_size(allocated.astype(np.int64) + first_index, BLOCK_SIZE, virtual_size)
    data_end = header["offset_data"] + (furthest + 1) * (BLOCK_SIZE + header["block_extra"]) if furthest >= 0 else 0
    return total, data_end


FORMAT = ContainerFormat(NAME, probe, inspect)
