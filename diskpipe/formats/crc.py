"""CRC-32C (Castagnoli), which VHDX uses for its headers and tables.

google-crc32c computes it in C; the table-driven fallback keeps the
inspectors working (slowly) where that wheel is missing. The wheel is
imported on the first VHDX checksum, not at start-up: it costs a few
milliseconds that a `diskpipe info` of any other format should not pay.
"""

from __future__ import annotations

from functools import cache
from typing import Any


@cache
def _accelerated() -> Any:
    try:
        import google_crc32c
    except ImportError:  # pragma: no cover - exercised only without the wheel
        return None
    return google_crc32c


_POLYNOMIAL = 0x82F63B78  # reflected Castagnoli polynomial


@cache
def _table() -> tuple[int, ...]:
    rows = []
    for byte in range(256):
        value = byte
        for _ in range(8):
            value = (value >> 1) ^ _POLYNOMIAL if value & 1 else value >> 1
        rows.append(value)
    return tuple(rows)


def _crc32c_python(data: bytes) -> int:
    table = _table()
    crc = 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def crc32c(data: bytes) -> int:
    accelerated = _accelerated()
    if accelerated is not None:
        return int(accelerated.value(bytes(data)))
    return _crc32c_python(data)
