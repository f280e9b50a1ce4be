"""On-disk layouts written as data: "offset code name" rows.

Each format module writes its headers as a table close to the spec's own,
a string passed to `Layout` (here a big-endian header of 16 bytes):

    0   4s  magic
    4   I   version
    8   Q   size

one field a row: its byte offset, its `struct` code and its name. The rows
must tile the structure: each field starts where the one before it ends
(from the first row's offset on), and bytes the code does not read are a
row of their own with an `x` code ("12 4x reserved"), named as the spec
names them. `Layout.check` holds the offsets against the codes, and the
tests run it on every format's tables (tests/test_layout.py), so a mistyped
offset or code fails there instead of reading the wrong bytes.
`Layout.parse` turns bytes into a dict of the named fields with one
precompiled `struct` call.
"""

from __future__ import annotations

import struct

from diskpipe.formats.errors import FormatError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from typing import Any


class Layout:
    """A fixed-size structure with named fields at fixed offsets."""

    def __init__(self, fmt: str, name: str, endian: str, rows: str) -> None:
        """`rows`: "offset code name" fields, one a line (or separated by commas).
        Building a layout reads only the codes and names: `check` (run by the
        tests over every format's tables) holds the offsets against them,
        which keeps the parsing of a few hundred numbers out of start-up."""
        self.format = fmt
        self.name = name
        self.endian = endian
        self.cells = rows.replace(",", " ").split()  # offset, code, name, offset, code, name, ...
        codes = self.cells[1::3]
        fields = self.cells[2::3]
        packed = "".join(codes)
        if "x" in packed:  # padding rows name no field
            fields = [field for field, code in zip(fields, codes, strict=False) if code[-1] != "x"]
        start = int(self.cells[0], 0) if self.cells else 0
        self.start = start  # the first field's offset
        self._struct = struct.Struct(f"{endian}{start}x{packed}" if start else endian + packed)
        self._names = tuple(fields)
        self.size = self._struct.size

    def check(self) -> None:
        """ValueError unless the rows tile the structure: each field starts where
        the one before it ends, at the offset its row states."""
        words = self.cells
        if not words or len(words) % 3 or self.endian not in ("<", ">"):
            raise ValueError(f"{self.name}: rows are offset, code and name, in '<' or '>' byte order")
        cursor = int(words[0], 0)
        for offset, code, field in zip(words[::3], words[1::3], words[2::3], strict=True):
            if code[:-1] and code[-1] not in "sx":
                # "2I" unpacks two values for one name: every field after it would be misnamed.
                raise ValueError(f"{self.name}: {field} has a repeat count ({code}); only s and x rows take one")
            if int(offset, 0) != cursor:
                raise ValueError(f"{self.name}: {field} is at {offset}, the field before it ends at {cursor}")
            cursor += struct.calcsize(self.endian + code)

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
        # One value per name: `check` refuses the repeat counts that would
        # unpack more (tests/test_layout.py), so zip's strict mode, whose
        # keyword argument costs a sixth of a parse, has nothing to catch.
        return dict(zip(self._names, self._struct.unpack_from(data, offset)))  # noqa: B905


def entries_in_use(data: bytes, start: int, entry_size: int, count: int) -> int:
    """How many of `count` table entries of `entry_size` bytes from `start`
    can hold anything: those before the table's trailing run of zero bytes.
    A header may claim thousands of empty slots; skipping them in C keeps
    such a table from costing a parse per slot. A table cut short by the
    end of `data` is left whole, so parsing it reports the truncation."""
    if entry_size <= 0 or count <= 0:
        return 0
    if start + count * entry_size > len(data):
        return count
    used = _used_length(data[start : start + count * entry_size])
    return min(count, -(-used // entry_size))


_ZERO_BLOCK = bytes(4096)


def _used_length(data: bytes) -> int:
    """Length of `data` without its trailing zero bytes. bytes.rstrip(b"\0")
    tests byte by byte; whole 4 KiB blocks compared with zeros (memcmp) go
    ten times faster, and only the last block with data is looked into."""
    end = len(data)
    while end > 0:
        start = max(0, end - len(_ZERO_BLOCK))
        block = data[start:end]
        if block != _ZERO_BLOCK[: end - start]:
            # The block read as a little-endian number: its last nonzero
            # byte is its most significant one. The conversion runs in C
            # over the whole block, several times faster than rstrip(b"\0").
            return start + (int.from_bytes(block, "little").bit_length() + 7) // 8
        end = start
    return 0


def nonzero_from(data: bytes, start: int) -> bool:
    """Whether any byte of `data` from `start` on is not zero (in C: `any()`
    over bytes walks them one Python object at a time, and `count(0)` one
    byte at a time; whole blocks compared with zeros go faster). The blocks
    are compared in place (`startswith` at an offset is a memcmp): cutting
    the rest of a 10 KiB descriptor region out first, and each block out of
    that, copied it twice for a yes or no."""
    position = max(0, start)
    block = len(_ZERO_BLOCK)
    end = len(data)
    while end - position > block:
        if not data.startswith(_ZERO_BLOCK, position):
            return True
        position += block
    return position < end and not _ZERO_BLOCK.startswith(data[position:end])


def c_string(raw: bytes) -> str:
    """Bytes up to the first NUL, decoded leniently (names from untrusted headers)."""
    end = raw.find(b"\0")
    if end >= 0:
        raw = raw[:end]
    return raw.decode("utf-8", "backslashreplace")


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
