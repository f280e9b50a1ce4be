"""CRC-32C (Castagnoli), which VHDX uses for its headers and tables.

google-crc32c computes it in C; the table-driven fallback keeps the
inspectors working (slowly) where that wheel is missing. The wheel is
imported on the first VHDX checksum, not at start-up: it costs a few
milliseconds that a `diskpipe info` of any other format should not pay.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from typing import Any

# Loaded on first use, then kept (functools.cache would cost its import at start-up).
_loaded: dict[str, Any] = {}


def _accelerated() -> Any:
    if "module" not in _loaded:
        try:
            import google_crc32c

            _loaded["module"] = google_crc32c
        except ImportError:  # pragma: no cover - exercised only without the wheel
            _loaded["module"] = None
    return _loaded["module"]


_POLYNOMIAL = 0x82F63B78  # reflected Castagnoli polynomial


def _table() -> tuple[int, ...]:
    if "table" in _loaded:
        table: tuple[int, ...] = _loaded["table"]
        return table
    rows = []
    for byte in range(256):
        value = byte
        for _ in range(8):
            value = (value >> 1) ^ _POLYNOMIAL if value & 1 else value >> 1
        rows.append(value)
    _loaded["table"] = tuple(rows)
    return _loaded["table"]  # type: ignore[no-any-return]


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


def crc32c_zeroed(data: bytes, start: int, end: int) -> int:
    """CRC-32C of `data` with bytes [start, end) counted as zeros: a
    structure's checksum over itself, its own checksum field zeroed. The
    parts are fed to the checksum in turn rather than joined: joining them
    copied a 64 KiB VHDX region table twice, which cost several times the
    checksum itself."""
    accelerated = _accelerated()
    if accelerated is None:
        return _crc32c_python(data[:start] + bytes(end - start) + data[end:])
    crc = accelerated.extend(0, data[:start])
    crc = accelerated.extend(crc, bytes(end - start))
    return int(accelerated.extend(crc, bytes(data[end:])))
