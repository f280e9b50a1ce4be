"""MBR and GPT partition tables inside raw data (docs/formats.md §9; UEFI spec ch. 5).

`55 AA` at byte 510 is not unique to partition tables: FAT/NTFS boot sectors
and x86 kernels carry it too, so an MBR needs sane entries and must not look
like either of those.
"""

from __future__ import annotations

import zlib

from diskpipe.formats.info import Content
from diskpipe.formats.layout import Layout, entries_in_use

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from typing import Any

MBR_SIGNATURE = b"\x55\xaa"
MBR_ENTRIES_OFFSET = 446
MBR_ENTRY = Layout("mbr", "partition entry", "<", """
    0   B   status
    1   3s  start_chs
    4   B   type
    5   3s  end_chs
    8   I   start_lba
    12  I   sectors
""")  # fmt: skip
GPT_HEADER = Layout("gpt", "GPT header", "<", """
    0   8s   signature
    8   I    revision
    12  I    header_size
    16  I    header_crc
    20  4x   reserved
    24  Q    current_lba
    32  Q    backup_lba
    40  Q    first_usable
    48  Q    last_usable
    56  16s  disk_guid
    72  Q    entries_lba
    80  I    entry_count
    84  I    entry_size
    88  I    entries_crc
""")  # fmt: skip
GPT_ENTRY = Layout("gpt", "GPT entry", "<", """
    0   16s  type_guid
    16  16s  unique_guid
    32  Q    first_lba
    40  Q    last_lba
    48  Q    attributes
    56  72s  name
""")  # fmt: skip
UNUSED_GUID = bytes(16)  # the type GUID of an empty GPT slot
PROTECTIVE_TYPE = 0xEE
MAX_REPORTED_PARTITIONS = 16


def _guid_text(raw: bytes) -> str:
    reordered = raw[3::-1] + raw[5:3:-1] + raw[7:5:-1] + raw[8:]
    text = reordered.hex().upper()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def mbr_entries(sector: bytes) -> list[dict[str, Any]]:
    """The four primary entries, empty ones included (type 0)."""
    entries = []
    for index in range(4):
        entry = MBR_ENTRY.parse(sector, MBR_ENTRIES_OFFSET + index * 16)
        entries.append(
            {
                "index": index,
                "status": entry["status"],
                "type": entry["type"],
                "start-chs": entry["start_chs"].hex(),
                "start-lba": entry["start_lba"],
                "sectors": entry["sectors"],
            }
        )
    return entries


def looks_like_boot_sector(sector: bytes) -> str | None:
    """A filesystem boot sector (VBR), which also ends in 55 AA."""
    if sector[3:11] == b"NTFS    ":
        return "ntfs"
    if sector[3:11] == b"EXFAT   ":
        return "exfat"
    if sector[82:90] == b"FAT32   ":
        return "fat32"
    if sector[54:62] in (b"FAT12   ", b"FAT16   "):
        return sector[54:59].decode().lower()
    if sector[0x10] == 2 and sector[0x15] == 0xF8 and sector[0] in (0xEB, 0xE9):
        return "fat"
    return None


def sniff_mbr(head: bytes) -> Content | None:
    if len(head) < 512 or head[510:512] != MBR_SIGNATURE:
        return None
    if head[0x202:0x206] == b"HdrS" or looks_like_boot_sector(head[:512]):
        return None
    entries = mbr_entries(head)
    used = [entry for entry in entries if entry["type"] != 0]
    if not used:
        return None
    if any(entry["status"] not in (0x00, 0x80) for entry in entries):
        return None
    if any(entry["sectors"] == 0 for entry in used):
        return None
    partitions = [{key: entry[key] for key in ("index", "status", "type", "start-lba", "sectors")} for entry in used]
    protective = any(entry["type"] == PROTECTIVE_TYPE for entry in used)
    return Content("mbr", "protective" if protective else "dos", {"partitions": partitions, "entries": entries})


def sniff_gpt(head: bytes) -> Content | None:
    for sector_size in (512, 4096):
        found = _gpt_at(head, sector_size)
        if found is not None:
            return found
    return None


def _gpt_at(head: bytes, sector_size: int) -> Content | None:
    raw = head[sector_size : sector_size + 512]
    if len(raw) < GPT_HEADER.size or raw[:8] != b"EFI PART":
        return None
    header = GPT_HEADER.parse(raw)
    header_size = header["header_size"]
    header_crc_valid = False
    if 92 <= header_size <= min(sector_size, len(raw)):
        blanked = raw[:16] + b"\0\0\0\0" + raw[20:header_size]
        header_crc_valid = zlib.crc32(blanked) == header["header_crc"]
    details: dict[str, Any] = {
        "sector-size": sector_size,
        "header-crc-valid": header_crc_valid,
        "current-lba": header["current_lba"],
        "backup-lba": header["backup_lba"],
        "entry-count": header["entry_count"],
        "entry-size": header["entry_size"],
        "disk-guid": _guid_text(header["disk_guid"]),
    }
    entries_start = header["entries_lba"] * sector_size
    entries_bytes = header["entry_count"] * header["entry_size"]
    if header["entry_size"] >= GPT_ENTRY.size and entries_start + entries_bytes <= len(head):
        table = head[entries_start : entries_start + entries_bytes]
        details["entries-crc-valid"] = zlib.crc32(table) == header["entries_crc"]
        partitions: list[dict[str, Any]] = []
        entry_size = header["entry_size"]
        for index in range(entries_in_use(table, 0, entry_size, header["entry_count"])):
            if table[index * entry_size : index * entry_size + 16] == UNUSED_GUID:
                continue  # an empty slot (cheaper to tell than to parse)
            entry = GPT_ENTRY.parse(table, index * entry_size)
            if len(partitions) < MAX_REPORTED_PARTITIONS:
                partitions.append(
                    {
                        "index": index,
                        "type": _guid_text(entry["type_guid"]),
                        "first-lba": entry["first_lba"],
                        "last-lba": entry["last_lba"],
                        "name": entry["name"].decode("utf-16-le", "replace").rstrip("\0"),
                    }
                )
            details["partition-count"] = details.get("partition-count", 0) + 1
        details["partitions"] = partitions
        details.setdefault("partition-count", 0)
    if head[510:512] == MBR_SIGNATURE:
        details["mbr-entries"] = mbr_entries(head)
    return Content("gpt", "gpt", details)
