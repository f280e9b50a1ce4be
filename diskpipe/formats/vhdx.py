"""VHDX: docs/formats.md §4, Microsoft's [MS-VHDX] specification.

Structures whose CRC-32C fails are treated as qemu treats them: one bad
header copy is tolerated, a bad region table is an error.
"""

from __future__ import annotations

from itertools import pairwise

from diskpipe.formats import allocation
from diskpipe.formats.base import ContainerFormat, InspectOptions, read_exact
from diskpipe.formats.crc import crc32c_zeroed
from diskpipe.formats.errors import FormatError, Unavailable
from diskpipe.formats.info import Facts
from diskpipe.formats.layout import Layout, entries_in_use
from diskpipe.formats.reads import MAX_READ, GetSize, Read, Request

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from collections.abc import Generator
    from typing import Any

    from diskpipe.formats.base import Inspection

NAME = "vhdx"
SIGNATURE = b"vhdxfile"
KiB, MiB = 1024, 1024 * 1024
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
HEADER_SIZE = 4 * KiB
REGION_TABLE_OFFSET = 192 * KiB
REGION_TABLE_SIZE = 64 * KiB
METADATA_TABLE_SIZE = 64 * KiB
MAX_ENTRIES = 2047
# Metadata items this close together are read at once (a bound on the
# bytes read for them: hostile offsets spread them out, then each is
# read alone).
ITEMS_SPAN = 64 * KiB

HEADER = Layout(NAME, "header", "<", """
    0   4s   signature
    4   I    checksum
    8   Q    sequence_number
    16  16s  file_write_guid
    32  16s  data_write_guid
    48  16s  log_guid
    64  H    log_version
    66  H    version
    68  I    log_length
    72  Q    log_offset
""")  # fmt: skip
TABLE_HEADER = Layout(NAME, "region table header", "<", """
    0  4s  signature
    4  I   checksum
    8  I   entry_count
""")  # fmt: skip
REGION_ENTRY = Layout(NAME, "region table entry", "<", """
    0   16s  guid
    16  Q    file_offset
    24  I    length
    28  I    flags
""")  # fmt: skip
METADATA_HEADER = Layout(NAME, "metadata table header", "<", """
    0   8s  signature
    8   2x  reserved
    10  H   entry_count
""")  # fmt: skip
METADATA_ENTRY = Layout(NAME, "metadata table entry", "<", """
    0   16s  guid
    16  I    offset
    20  I    length
    24  I    flags
""")  # fmt: skip
METADATA_ENTRY_SIZE = 32  # the entry is padded past its last field
PARENT_LOCATOR_HEADER = Layout(NAME, "parent locator header", "<", """
    0   16s  locator_type
    16  2x   reserved
    18  H    key_value_count
""")  # fmt: skip
PARENT_LOCATOR_ENTRY = Layout(NAME, "parent locator entry", "<", """
    0   I  key_offset
    4   I  value_offset
    8   H  key_length
    10  H  value_length
""")  # fmt: skip


def guid(text: str) -> bytes:
    """A GUID in its on-disk (mixed-endian) byte order."""
    raw = bytes.fromhex(text.replace("-", ""))
    return raw[3::-1] + raw[5:3:-1] + raw[7:5:-1] + raw[8:]


BAT_REGION = guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_REGION = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_DATA = guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
MANDATORY_ITEMS = {
    FILE_PARAMETERS: "file parameters",
    VIRTUAL_DISK_SIZE: "virtual disk size",
    PAGE83_DATA: "page 83 data",
    LOGICAL_SECTOR_SIZE: "logical sector size",
    PHYSICAL_SECTOR_SIZE: "physical sector size",
}
REGION_REQUIRED = 1
ITEM_REQUIRED = 4
PARAMS_HAS_PARENT = 2
BAT_STATE_FULLY_PRESENT = 6
BAT_STATE_PARTIALLY_PRESENT = 7
BAT_OFFSET_MASK = 0xFFFFFFFFFFF00000


def probe(buffer: bytes) -> bool:
    return buffer[:8] == SIGNATURE


def _valid_checksum(raw: bytes, size: int) -> bool:
    if len(raw) < size:
        return False
    stored = int.from_bytes(raw[4:8], "little")
    return crc32c_zeroed(raw[:size], 4, 8) == stored


def _choose_header(copies: list[bytes]) -> dict[str, Any]:
    """qemu's rule: the valid copy with the higher sequence number."""
    valid = []
    for index, raw in enumerate(copies):
        if len(raw) >= HEADER_SIZE and raw[:4] == b"head" and _valid_checksum(raw, HEADER_SIZE):
            header = HEADER.parse(raw)
            if header["version"] == 1:
                valid.append((header["sequence_number"], index, header, raw))
    if not valid:
        raise FormatError(NAME, "no valid VHDX header found", offset=HEADER_OFFSETS[0])
    if len(valid) == 2 and valid[0][0] == valid[1][0] and valid[0][3] != valid[1][3]:
        raise FormatError(NAME, "both headers have the same sequence number but differ", offset=HEADER_OFFSETS[0])
    return max(valid, key=lambda item: (item[0], -item[1]))[2]


def inspect(head: bytes, options: InspectOptions) -> Inspection:
    copies = []
    for offset in HEADER_OFFSETS:
        copies.append((yield from read_exact(offset, HEADER_SIZE, head)))
    header = _choose_header(copies)
    anomalies: list[dict[str, str]] = []
    details: dict[str, Any] = {"anomalies": anomalies}

    raw_regions = yield from read_exact(REGION_TABLE_OFFSET, REGION_TABLE_SIZE, head)
    regions = _parse_regions(raw_regions, anomalies)
    bat, metadata = regions[BAT_REGION], regions[METADATA_REGION]
    _check_overlaps(regions, header, anomalies)
    yield from _check_log(header, anomalies)

    # qemu's files put the BAT before the metadata that describes it: in a
    # stream, keep a small BAT as it passes and read it after the metadata.
    early_bat = None
    if options.allocation and bat["file_offset"] < metadata["file_offset"] and bat["length"] <= MAX_READ:
        try:
            early_bat = yield Read(bat["file_offset"], bat["length"])
        except Unavailable:
            early_bat = None

    items = yield from _read_metadata(metadata, anomalies)
    block_size, logical_sector, disk_size = _disk_geometry(items, details)
    chunk_ratio = (1 << 23) * logical_sector // block_size
    data_blocks = -(-disk_size // block_size)
    bat_entries = data_blocks + (data_blocks - 1) // chunk_ratio if data_blocks else 0
    if bat_entries * 8 > bat["length"]:
        anomalies.append(
            {
                "name": "bat_too_small",
                "message": f"BAT region holds {bat['length'] // 8} entries, the disk needs {bat_entries}",
            }
        )

    allocated = None
    data_end = 0
    if options.allocation and bat_entries * 8 <= bat["length"]:
        try:
            allocated, data_end = yield from _count_allocation(
                bat["file_offset"], bat_entries, chunk_ratio, block_size, disk_size, early_bat
            )
        except Unavailable:
            allocated = None
    file_size: int = yield GetSize()
    if data_end > file_size:
        anomalies.append(
            {"name": "allocation_past_eof", "message": "a fully present block lies past the end of the file"}
        )
    return Facts(
        format=NAME,
        virtual_size=disk_size // 512 * 512,
        cluster_size=block_size,
        subformat="fixed" if items["file_parameters"]["leave_blocks_allocated"] else "dynamic",
        details=details,
        allocated_size=allocated,
    )


def _check_log(header: dict[str, Any], anomalies: list[dict[str, str]]) -> Generator[Request, Any, None]:
    if any(header["log_guid"]) and header["log_length"] and (yield from _log_has_entries(header, anomalies)):
        anomalies.append(
            {
                "name": "pending_log",
                "message": "the log holds entries that need replaying (qemu refuses a read-only open)",
            }
        )


def _disk_geometry(items: dict[str, Any], details: dict[str, Any]) -> tuple[int, int, int]:
    """(block size, logical sector size, virtual disk size), checked as qemu
    checks them; records them and the parent in `details`."""
    params = items["file_parameters"]
    block_size, has_parent = params["block_size"], params["has_parent"]
    if not (MiB <= block_size <= 256 * MiB and block_size & (block_size - 1) == 0):
        raise FormatError(NAME, f"invalid block size {block_size}", field="file parameters")
    logical_sector = items["logical_sector_size"]
    if logical_sector != 512:
        raise FormatError(NAME, f"logical sector size {logical_sector} is not supported by qemu (512 only)")
    details.update(
        {
            "block-size": block_size,
            "logical-sector-size": logical_sector,
            "physical-sector-size": items["physical_sector_size"],
            "leave-blocks-allocated": params["leave_blocks_allocated"],
        }
    )
    if has_parent or "parent_locator" in items:
        details["parent"] = items.get("parent_locator", {})
        details["has-parent"] = has_parent
    return block_size, logical_sector, items["virtual_disk_size"]


def _entries_read(table: str, count: int, anomalies: list[dict[str, str]]) -> int:
    """How many of a table's `count` entries are read: at most MAX_ENTRIES,
    and a claim of more is an anomaly."""
    if count <= MAX_ENTRIES:
        return count
    anomalies.append(
        {"name": f"{table}_table_limits", "message": f"{table} table has {count} entries (limit {MAX_ENTRIES})"}
    )
    return MAX_ENTRIES


def _parse_regions(raw: bytes, anomalies: list[dict[str, str]]) -> dict[bytes, dict[str, Any]]:
    table = TABLE_HEADER.parse(raw, file_offset=REGION_TABLE_OFFSET)
    if table["signature"] != b"regi" or not _valid_checksum(raw, REGION_TABLE_SIZE):
        raise FormatError(NAME, "region table is corrupt (signature or CRC-32C)", offset=REGION_TABLE_OFFSET)
    count = _entries_read("region", table["entry_count"], anomalies)
    regions: dict[bytes, dict[str, Any]] = {}
    for index in range(entries_in_use(raw, 16, REGION_ENTRY.size, count)):
        entry = REGION_ENTRY.parse(raw, 16 + index * REGION_ENTRY.size)
        if not any(entry["guid"]):
            continue  # an empty slot (an over-long entry count reads them)
        known = entry["guid"] in (BAT_REGION, METADATA_REGION)
        if entry["guid"] in regions:
            raise FormatError(
                NAME, "a region appears twice in the region table", offset=REGION_TABLE_OFFSET + 16 + index * 32
            )
        if not known and entry["flags"] & REGION_REQUIRED:
            anomalies.append(
                {"name": "unknown_required_region", "message": f"unknown required region {entry['guid'].hex()}"}
            )
        if entry["file_offset"] % MiB or entry["length"] % MiB:
            anomalies.append({"name": "region_alignment", "message": "a region is not aligned to 1 MiB"})
        regions[entry["guid"]] = entry
    for region_guid, label in ((BAT_REGION, "BAT"), (METADATA_REGION, "metadata")):
        if region_guid not in regions:
            raise FormatError(NAME, f"the {label} region is missing", offset=REGION_TABLE_OFFSET)
    return regions


def _check_overlaps(
    regions: dict[bytes, dict[str, Any]], header: dict[str, Any], anomalies: list[dict[str, str]]
) -> None:
    spans = [(entry["file_offset"], entry["file_offset"] + entry["length"]) for entry in regions.values()]
    if header["log_length"]:
        spans.append((header["log_offset"], header["log_offset"] + header["log_length"]))
    spans.append((0, MiB))  # the header section
    spans.sort()
    for (_, end_a), (start_b, _) in pairwise(spans):
        if start_b < end_a:
            anomalies.append(
                {"name": "region_overlap", "message": "regions overlap each other, the log or the headers"}
            )
            return


def _log_has_entries(header: dict[str, Any], anomalies: list[dict[str, str]]) -> Generator[Request, Any, bool]:
    """A log with an entry ("loge" at a 4 KiB boundary) would be replayed."""
    length = header["log_length"]
    if length % MiB:
        anomalies.append({"name": "log_length", "message": f"log length {length} is not a multiple of 1 MiB"})
    if length > MAX_READ:
        return True  # too large to look at within the memory bound: assume the worst
    try:
        log: bytes = yield Read(header["log_offset"], length)
    except Unavailable:
        return True
    return any(log[offset : offset + 4] == b"loge" for offset in range(0, len(log), 4 * KiB))


def _read_metadata(region: dict[str, Any], anomalies: list[dict[str, str]]) -> Generator[Request, Any, dict[str, Any]]:
    start = region["file_offset"]
    raw: bytes = yield Read(start, min(METADATA_TABLE_SIZE, region["length"]))
    wanted = _metadata_entries(raw, region, anomalies)
    # (guid, file offset, length) in file order: a stream answers them all.
    places = sorted(
        ((item_guid, start + entry["offset"], min(entry["length"], MAX_READ)) for item_guid, entry in wanted.items()),
        key=lambda place: place[1],
    )
    items: dict[str, Any] = {}
    for item_guid, offset, data in (yield from _read_items(places)):
        _parse_item(item_guid, data, offset, items)
    return items


def _read_items(places: list[tuple[bytes, int, int]]) -> Generator[Request, Any, list[tuple[bytes, int, bytes]]]:
    """(guid, file offset, bytes) of each item. Items that lie within
    ITEMS_SPAN of each other (qemu's and Hyper-V's files keep them together
    after the table) come in one read and are cut from it: the same bytes,
    also cut short at the end of the data, for one request instead of five."""
    first = places[0][1]
    end = max(offset + length for _, offset, length in places)
    if end - first <= ITEMS_SPAN:
        span: bytes = yield Read(first, end - first)
        return [
            (item_guid, offset, span[offset - first : offset - first + length]) for item_guid, offset, length in places
        ]
    found = []
    for item_guid, offset, length in places:
        data: bytes = yield Read(offset, length)
        found.append((item_guid, offset, data))
    return found


def _metadata_entries(
    raw: bytes, region: dict[str, Any], anomalies: list[dict[str, str]]
) -> dict[bytes, dict[str, Any]]:
    """The table's entries for the items diskpipe reads, by GUID."""
    start = region["file_offset"]
    table = METADATA_HEADER.parse(raw, file_offset=start)
    if table["signature"] != b"metadata":
        raise FormatError(NAME, "metadata table signature missing", offset=start)
    count = _entries_read("metadata", table["entry_count"], anomalies)
    wanted: dict[bytes, dict[str, Any]] = {}
    for index in range(entries_in_use(raw, 32, METADATA_ENTRY_SIZE, count)):
        entry = METADATA_ENTRY.parse(
            raw, 32 + index * METADATA_ENTRY_SIZE, file_offset=start + 32 + index * METADATA_ENTRY_SIZE
        )
        known = entry["guid"] in MANDATORY_ITEMS or entry["guid"] == PARENT_LOCATOR
        if not known and entry["flags"] & ITEM_REQUIRED:
            anomalies.append(
                {
                    "name": "unknown_required_metadata",
                    "message": f"unknown required metadata item {entry['guid'].hex()}",
                }
            )
        if known:
            if entry["guid"] in wanted:
                raise FormatError(NAME, "a metadata item appears twice", offset=start + 32 + index * 32)
            if entry["offset"] + entry["length"] > region["length"]:
                raise FormatError(
                    NAME, "a metadata item lies outside the metadata region", offset=start + 32 + index * 32
                )
            wanted[entry["guid"]] = entry
    for item_guid, label in MANDATORY_ITEMS.items():
        if item_guid not in wanted:
            raise FormatError(NAME, f"mandatory metadata item '{label}' is missing", offset=start)
    return wanted


def _parse_item(item_guid: bytes, data: bytes, offset: int, items: dict[str, Any]) -> None:
    """One metadata item's value into `items`."""
    if item_guid == FILE_PARAMETERS:
        if len(data) < 8:
            raise FormatError(NAME, "file parameters truncated", offset=offset)
        flags = int.from_bytes(data[4:8], "little")
        items["file_parameters"] = {
            "block_size": int.from_bytes(data[:4], "little"),
            "leave_blocks_allocated": bool(flags & 1),
            "has_parent": bool(flags & PARAMS_HAS_PARENT),
        }
        return
    if item_guid == PARENT_LOCATOR:
        items["parent_locator"] = _parse_parent_locator(data)
        return
    size = 8 if item_guid == VIRTUAL_DISK_SIZE else 4 if item_guid != PAGE83_DATA else 16
    if len(data) < size:
        raise FormatError(NAME, f"metadata item '{MANDATORY_ITEMS[item_guid]}' truncated", offset=offset)
    if item_guid == VIRTUAL_DISK_SIZE:
        items["virtual_disk_size"] = int.from_bytes(data[:8], "little")
    elif item_guid == LOGICAL_SECTOR_SIZE:
        items["logical_sector_size"] = int.from_bytes(data[:4], "little")
    elif item_guid == PHYSICAL_SECTOR_SIZE:
        items["physical_sector_size"] = int.from_bytes(data[:4], "little")


def _parse_parent_locator(data: bytes) -> dict[str, Any]:
    """Key/value pairs (UTF-16LE) such as parent_linkage and relative_path."""
    if len(data) < PARENT_LOCATOR_HEADER.size:
        return {"entries": {}}
    header = PARENT_LOCATOR_HEADER.parse(data)
    entries: dict[str, str] = {}
    for index in range(min(header["key_value_count"], MAX_ENTRIES)):
        position = 20 + index * PARENT_LOCATOR_ENTRY.size
        if position + PARENT_LOCATOR_ENTRY.size > len(data):
            break
        entry = PARENT_LOCATOR_ENTRY.parse(data, position)
        key = data[entry["key_offset"] : entry["key_offset"] + entry["key_length"]]
        value = data[entry["value_offset"] : entry["value_offset"] + entry["value_length"]]
        entries[key.decode("utf-16-le", "replace")] = value.decode("utf-16-le", "replace")
    return {"type": header["locator_type"].hex(), "entries": entries}


def _count_allocation(
    bat_offset: int,
    bat_entries: int,
    chunk_ratio: int,
    block_size: int,
    disk_size: int,
    early_bat: bytes | None,
) -> Generator[Request, Any, tuple[int, int]]:
    """(guest bytes in present blocks, end of the furthest present block)."""
    np = allocation.numpy()
    total = 0
    data_end = 0
    for first_index, piece_offset, piece_length in allocation.table_pieces(bat_offset, bat_entries * 8, 8):
        if early_bat is not None:
            relative = piece_offset - bat_offset
            piece = early_bat[relative : relative + piece_length]
        else:
            piece = yield Read(piece_offset, piece_length)
        if not piece:
            break  # past the end of the data: the rest of the table reads as zeros
        entries = np.frombuffer(piece.ljust(piece_length, b"\0"), dtype="<u8")
        indexes = np.arange(first_index, first_index + entries.size, dtype=np.int64)
        payload = (indexes + 1) % (chunk_ratio + 1) != 0  # every (ratio+1)th entry is a bitmap
        states = entries & np.uint64(7)
        present = payload & ((states == BAT_STATE_FULLY_PRESENT) | (states == BAT_STATE_PARTIALLY_PRESENT))
        if present.any():
            offsets = entries[present] & np.uint64(BAT_OFFSET_MASK)
            data_end = max(data_end, int(offsets.max()) + block_size)
            block_numbers = indexes[present] - indexes[present] // (chunk_ratio + 1)
            total += allocation.clip_to_size(block_numbers, block_size, disk_size)
    return total, data_end


FORMAT = ContainerFormat(NAME, probe, inspect)
