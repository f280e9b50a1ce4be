"""Layout tables: "offset code name" rows that must tile the structure."""

from __future__ import annotations

import importlib
import pkgutil
import struct
from typing import Any

import pytest

import diskpipe.formats
from diskpipe.formats.errors import FormatError
from diskpipe.formats.layout import Layout


def format_layouts() -> list[Any]:
    """Every Layout a diskpipe.formats module defines at its top level."""
    found = []
    for module_info in pkgutil.iter_modules(diskpipe.formats.__path__):
        module = importlib.import_module(f"diskpipe.formats.{module_info.name}")
        for key, value in vars(module).items():
            if isinstance(value, Layout):
                found.append(pytest.param(value, id=f"{module_info.name}.{key}"))
    return found


@pytest.mark.parametrize("layout", format_layouts())
def test_every_format_table_tiles(layout: Layout) -> None:
    layout.check()
    # The structure ends where its last row does: no padding past the table.
    assert layout.size == int(layout.cells[-3], 0) + struct.calcsize(layout.endian + layout.cells[-2])


def test_fields_are_read_at_their_offsets() -> None:
    header = Layout("demo", "header", ">", """
        0   4s  magic
        4   I   version
        8   4x  reserved
        12  Q   size
    """)  # fmt: skip
    data = b"DEMO" + struct.pack(">I", 3) + b"\xff" * 4 + struct.pack(">Q", 1 << 40)
    header.check()
    assert header.size == 20
    assert header.parse(data) == {"magic": b"DEMO", "version": 3, "size": 1 << 40}


def test_a_table_may_start_past_zero_and_sit_on_one_line() -> None:
    part = Layout("demo", "part", "<", "0x40 I signature, 0x44 H version")
    part.check()
    data = bytes(0x40) + struct.pack("<IH", 0xBEDA107F, 2)
    assert part.size == 0x46
    assert part.parse(data) == {"signature": 0xBEDA107F, "version": 2}
    assert part.parse(b"\0\0" + data, 2) == {"signature": 0xBEDA107F, "version": 2}


@pytest.mark.parametrize(
    ("rows", "field"),
    [
        ("0 4s magic, 8 I version", "version"),  # a gap not written as an `x` row
        ("0 4s magic, 2 I version", "version"),  # overlaps the magic
        ("0 Q size, 4 I flags", "flags"),  # the code of the row before is wrong for these offsets
    ],
)
def test_rows_that_do_not_tile_fail_the_check(rows: str, field: str) -> None:
    with pytest.raises(ValueError, match=f"header: {field} is at"):
        Layout("demo", "header", "<", rows).check()


def test_a_short_buffer_is_a_format_error() -> None:
    header = Layout("demo", "header", "<", "0 4s magic, 4 I version")
    with pytest.raises(FormatError, match="header truncated: 6 of 8 bytes present"):
        header.parse(bytes(6))


@pytest.mark.parametrize(
    ("endian", "rows"),
    [
        ("<", ""),  # no row at all
        ("<", "0 4s magic, 4 I"),  # a row without its name
        ("=", "0 4s magic, 4 I version"),  # native order: sizes and alignment of this machine
    ],
)
def test_a_table_that_is_not_rows_of_three_in_a_fixed_order_fails_the_check(endian: str, rows: str) -> None:
    with pytest.raises(ValueError, match="rows are offset, code and name"):
        Layout("demo", "header", endian, rows).check()


def test_a_repeat_count_on_a_number_code_fails_the_check() -> None:
    """ "2I" unpacks two numbers for one name, so the names after it would
    shift by one: a table must write each number as its own row."""
    with pytest.raises(ValueError, match=r"header: pair has a repeat count \(2I\)"):
        Layout("demo", "header", "<", "0 4s magic, 4 2I pair, 12 H flags").check()
