"""Parallels / Virtuozzo (`format: parallels`, Glance's `ploop`). FORMATS.md §0;
qemu docs/interop/parallels.txt."""

from __future__ import annotations

from diskpipe.formats.base import ContainerFormat, Inspection, InspectOptions
from diskpipe.formats.errors import FormatError
from diskpipe.formats.info import Facts
from diskpipe.formats.layout import Layout
from diskpipe.formats.reads import GetSize

NAME = "parallels"
MAGIC_OLD = b"WithoutFreeSpace"
MAGIC_EXT = b"WithouFreSpacExt"
VERSION = 2
HEADER = Layout(NAME, "header", "<", [
    (0, "16s", "magic"),
    (16, "I", "version"),
    (20, "I", "heads"),
    (24, "I", "cylinders"),
    (28, "I", "tracks"),
    (32, "I", "bat_entries"),
    (36, "Q", "nb_sectors"),
    (44, "I", "inuse"),
    (48, "I", "data_off"),
    (52, "I", "flags"),
    (56, "Q", "ext_off"),
])  # fmt: skip
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
    file_size: int = yield GetSize()
    return Facts(
        format=NAME,
        virtual_size=sectors * 512,
        dirty=None,  # qemu reports no dirty-flag for parallels
        subformat="ext" if header["magic"] == MAGIC_EXT else "old",
        details={
            "cluster-bytes": header["tracks"] * 512,
            "unclean": header["inuse"] == INUSE_MAGIC,
            "file-size": file_size,
            "anomalies": [],
        },
    )


FORMAT = ContainerFormat(NAME, probe, inspect)
