"""On-disk layouts written as data: (offset, struct code, field name) rows.

Each format module writes its headers as a table close to the spec's own, and
`Layout.parse` turns bytes into a dict of named fields with one precompiled
`struct` call.
"""

from __future__ import annotations

import struct
from typing import Any

from diskpipe.formats.errors import FormatError


class Layout:
    """A fixed-size structure with named fields at fixed offsets."""

    def __init__(self, fmt: str, name: str, endian: str, fields: list[tuple[int, str, str]]) -> None:
        self.format = fmt
        self.name = name
        parts = [endian]
        names: list[str] = []
        cursor = 0
        for offset, code, field_name in sorted(fields):
            if offset < cursor:
                raise ValueError(f"{name}: field {field_name} overlaps the one before it")
            if offset > cursor:
                parts.append(f"{offset - cursor}x")
            parts.append(code)
            names.append(field_name)
            cursor = offset + struct.calcsize(endian + code)
        self._struct = struct.Struct("".join(parts))
        self._names = tuple(names)
        self.size = self._struct.size

    def parse(
        self, data: bytes | bytearray | memoryview, offset: int = 0, *, file_offset: int | None = None
    ) -> dict[str, Any]:
        """Fields of the structure at `offset` in `data`; FormatError if cut short."""
        if len(data) - offset < self.size:
            where = offset if file_offset is None else file_offset
            raise FormatError(
                self.format,
                f"{self.name} truncated: {max(0, len(data) - offset)} of {self.size} bytes present",
                offset=where,
            )
        return dict(zip(self._names, self._struct.unpack_from(data, offset), strict=True))


def c_string(raw: bytes) -> str:
    """Bytes up to the first NUL, decoded leniently (names from untrusted headers)."""
    end = raw.find(b"\0")
    if end >= 0:
        raw = raw[:end]
    return raw.decode("utf-8", "backslashreplace")


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
