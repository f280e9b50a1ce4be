"""CRC-32C (Castagnoli), which VHDX uses for its headers and tables.

google-crc32c computes it in C; the table-driven fallback keeps the
inspectors working (slowly) where that wheel is missing.
"""

from __future__ import annotations

from functools import cache
from typing import Any

_google_crc32c: Any
try:
    import google_crc32c as _google_crc32c
except ImportError:  # pragma: no cover - exercised only without the wheel
    _google_crc32c = None

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
    if _google_crc32c is not None:
        return int(_google_crc32c.value(bytes(data)))
    return _crc32c_python(data)
