"""Apple disk images (`format: dmg`): named, never mistaken for raw, refused
by the default policy (docs/formats.md §15).

qemu picks its dmg driver by file name alone (a name ending in `.dmg`); a real
UDIF image also ends with a 512-byte `koly` trailer, which diskpipe looks for
so a stream can be recognised too.
"""

from __future__ import annotations

from diskpipe.formats.info import Facts
from diskpipe.formats.layout import Layout

NAME = "dmg"
# The whole 512-byte block at the end of the file.
TRAILER = Layout(NAME, "koly trailer", ">", """
    0    4s    signature
    4    I     version
    8    I     header_size
    12   204x  flags_forks_and_data_checksum
    216  Q     xml_offset
    224  Q     xml_length
    232  260x  reserved_checksum_and_variant
    492  Q     sector_count
    500  12x   reserved
""")  # fmt: skip
TRAILER_SIZE = TRAILER.size  # 512, also the trailer's own header_size


def probe_name(filename: str | None) -> bool:
    """qemu's probe: a name longer than 4 characters ending in `.dmg`."""
    return filename is not None and len(filename) > 4 and filename.endswith(".dmg")


def has_trailer(tail: bytes) -> bool:
    # Every file's tail is asked: the signature alone settles almost all of
    # them, before the trailer is parsed.
    if len(tail) < TRAILER_SIZE or tail[-TRAILER_SIZE : 4 - TRAILER_SIZE] != b"koly":
        return False
    trailer = TRAILER.parse(tail[-TRAILER_SIZE:])
    return bool(trailer["signature"] == b"koly" and trailer["header_size"] == TRAILER_SIZE)


def facts(tail: bytes) -> Facts:
    """Size from the trailer's sector count (qemu sums its chunk tables instead)."""
    sectors = 0
    if has_trailer(tail):
        sectors = TRAILER.parse(tail[-TRAILER_SIZE:])["sector_count"]
    # qemu reports no dirty-flag for dmg.
    return Facts(
        format=NAME,
        virtual_size=sectors * 512,
        dirty=None,
        details={"koly-trailer": has_trailer(tail), "anomalies": []},
    )
