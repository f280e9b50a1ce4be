"""Bochs growing redolog images (`format: bochs`): detected and named so they
are never mistaken for raw; refused by the default policy. docs/formats.md §13; qemu block/bochs.c."""

from __future__ import annotations

from diskpipe.formats.base import ContainerFormat, InspectOptions
from diskpipe.formats.errors import FormatError
from diskpipe.formats.info import Facts
from diskpipe.formats.layout import Layout, c_string

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from diskpipe.formats.base import Inspection

NAME = "bochs"
HEADER = Layout(NAME, "header", "<", """
    0   32s  magic
    32  16s  type
    48  16s  subtype
    64  I    version
    68  I    header_size
    72  I    catalog
    76  I    bitmap
    80  I    extent
""")  # fmt: skip
# The disk size sits in a union: right after `extent` in version 1, after a
# reserved word in version 2.
DISK_OFFSET = {0x00010000: 84, 0x00020000: 88}
VERSION_1, VERSION_2 = 0x00010000, 0x00020000
MAX_CATALOG = 0x100000
MAX_EXTENT = 0x800000


def probe(buffer: bytes) -> bool:
    header = HEADER.parse(buffer)
    return (
        c_string(header["magic"]) == "Bochs Virtual HD Image"
        and c_string(header["type"]) == "Redolog"
        and c_string(header["subtype"]) == "Growing"
        and header["version"] in (VERSION_1, VERSION_2)
    )


def inspect(head: bytes, options: InspectOptions) -> Inspection:
    header = HEADER.parse(head)
    offset = DISK_OFFSET[header["version"]]
    disk = int.from_bytes(head[offset : offset + 8], "little")
    sectors = disk // 512
    extent = header["extent"]
    if header["catalog"] > MAX_CATALOG:
        raise FormatError(NAME, "catalog size is too large", field="catalog", offset=72)
    if extent < 512 or extent & (extent - 1) or extent > MAX_EXTENT:
        raise FormatError(NAME, f"invalid extent size {extent}", field="extent", offset=80)
    if header["catalog"] < -(-sectors // (extent // 512)):
        raise FormatError(NAME, "catalog size is too small for this disk size", field="catalog", offset=72)
    return Facts(format=NAME, virtual_size=sectors * 512, dirty=None, details={"anomalies": []})
    yield  # pragma: no cover - makes this a generator like every inspector


FORMAT = ContainerFormat(NAME, probe, inspect)
