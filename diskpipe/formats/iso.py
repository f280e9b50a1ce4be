"""ISO 9660 and UDF volumes inside raw data (docs/formats.md §8; ECMA-119, El Torito).

The default path reads the volume descriptors itself from the retained head;
`iso_details` asks pycdlib for more when the caller wants details.
"""

from __future__ import annotations

from diskpipe.formats.info import Content
from diskpipe.formats.layout import Layout

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from typing import Any

SECTOR = 2048
DESCRIPTORS_START = 16 * SECTOR  # sectors 0-15 are the system area
MAX_DESCRIPTORS = 32
TYPE_BOOT_RECORD, TYPE_PRIMARY, TYPE_SUPPLEMENTARY, TYPE_PARTITION, TYPE_TERMINATOR = 0, 1, 2, 3, 255
PRIMARY = Layout("iso", "primary volume descriptor", "<", """
    0    B     type
    1    5s    identifier
    6    B     version
    7    1x    unused
    8    32s   system_id
    40   32s   volume_id
    72   8x    unused
    80   I     space_size
    84   36x   space_size_msb_and_unused
    120  H     set_size
    122  6x    set_size_msb_and_sequence
    128  H     block_size
    130  683x  block_size_msb_to_bibliographic_file
    813  17s   creation_date
""")  # fmt: skip
EL_TORITO_ID = b"EL TORITO SPECIFICATION"
UDF_IDENTIFIERS = (b"BEA01", b"NSR02", b"NSR03", b"TEA01")


def _text(raw: bytes) -> str:
    return raw.decode("latin-1").rstrip(" \0")


def sniff(head: bytes) -> Content | None:
    details: dict[str, Any] = {}
    udf = []
    found_iso = False
    for index in range(MAX_DESCRIPTORS):
        start = DESCRIPTORS_START + index * SECTOR
        descriptor = head[start : start + SECTOR]
        if len(descriptor) < 7:
            break
        identifier = descriptor[1:6]
        if identifier in UDF_IDENTIFIERS:
            udf.append(identifier.decode())
            continue
        if identifier != b"CD001":
            break
        found_iso = True
        kind = descriptor[0]
        if kind == TYPE_PRIMARY and len(descriptor) >= PRIMARY.size and "volume-id" not in details:
            primary = PRIMARY.parse(descriptor)
            details.update(
                {
                    "volume-id": _text(primary["volume_id"]),
                    "system-id": _text(primary["system_id"]),
                    "space-size": primary["space_size"],
                    "block-size": primary["block_size"],
                    "volume-bytes": primary["space_size"] * primary["block_size"],
                }
            )
        elif kind == TYPE_BOOT_RECORD and descriptor[7:30] == EL_TORITO_ID:
            details["el-torito"] = True
            details["boot-catalog-sector"] = int.from_bytes(descriptor[71:75], "little")
        elif kind == TYPE_SUPPLEMENTARY:
            details["joliet"] = True
        elif kind == TYPE_TERMINATOR:
            break
    if found_iso:
        if udf:
            details["udf"] = udf
        return Content("iso", "iso9660", details)
    if "NSR02" in udf or "NSR03" in udf:
        return Content("iso", "udf", {"udf": udf})
    return None
