"""VMDK text descriptors: qemu's reading of them, and a strict reading.

qemu reads a descriptor with substring searches (the first "createType",
the first "CID", any line that scans as an extent). diskpipe reports what
qemu would use and, beside it, what a strict line-by-line reading finds:
lines that are not comments, `key=value` pairs, ddb entries or extents, text
hidden after a NUL, and values where the two readings disagree. docs/formats.md §6.4.
"""

from __future__ import annotations

from diskpipe.formats.errors import FormatError
from diskpipe.formats.layout import nonzero_from

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    import re
    from typing import Any, NamedTuple
else:
    from diskpipe.formats.tuples import NamedTuple

# qemu accepts these as standalone descriptor files; the two sparse types
# exist only as the descriptor embedded in a binary extent.
TEXT_CREATE_TYPES = frozenset({
    "monolithicFlat", "vmfs", "vmfsSparse", "seSparse", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
})  # fmt: skip
EXTENT_TYPES = frozenset({"FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE"})
FLAT_TYPES = frozenset({"FLAT", "VMFS"})
MAX_NAME = 511  # qemu's sscanf width for an extent file name
# sscanf("%10s %ld %10s \"%511[^\n\r\"]\" %ld"): access, sectors, type, "name", [offset].
# sscanf counts the fields it filled: a name longer than 511 characters (no
# closing quote where the format wants one) still fills four, and qemu opens
# the name cut at 511 — so the closing quote is optional here too.
_EXTENT_LINE = rb'[ \t\r\v\f]*(\S{1,10})[ \t\r\v\f]+([+-]?\d+)[ \t\r\v\f]+(\S{1,10})[ \t\r\v\f]+"([^\n\r"]{1,511})(?:"(?:[ \t\r\v\f]+([+-]?\d+))?)?'
_KEY_VALUE = rb'\s*([A-Za-z][A-Za-z0-9_.]*)\s*=\s*("[^"\r\n]*"|[^\s"]*)\s*$'
_STRICT_EXTENT = rb'\s*(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Z]+)\s+"([^"\r\n]*)"(?:\s+(\d+))?\s*$'
_HEX_NUMBER = rb"\s*(?:0[xX])?([0-9a-fA-F]+)"
# The patterns are compiled on first use: compiling them (and importing re)
# at import would cost every `diskpipe info` a few milliseconds.
_COMPILED: list[re.Pattern[bytes]] = []
MAX_REPORTED_LINES = 8
# A 1 MiB descriptor holds 65 Ki short extent lines, ~1 KiB of Python objects
# each once reported: tens of MB bought with one upload. An honest split
# image has one extent per 2 GiB (1024 for a 2 TiB disk).
MAX_EXTENTS = 4096


class Extent(NamedTuple):
    access: str
    sectors: int
    type: str
    filename: str
    offset: int | None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "access": self.access,
            "sectors": self.sectors,
            "type": self.type,
            "filename": self.filename,
        }
        if self.offset is not None:
            out["offset"] = self.offset
        return out


class Descriptor:
    """Facts of one descriptor text (standalone file or embedded)."""

    __slots__ = (
        "cid", "cid_valid", "create_type", "disagreements", "extents", "hidden_text",
        "parent_cid", "parent_hint", "text_bytes", "unexpected_lines",
    )  # fmt: skip

    def __init__(self, text_bytes: int) -> None:
        self.text_bytes = text_bytes
        self.create_type: str | None = None
        self.cid: int | None = None
        self.parent_cid: int | None = None
        self.cid_valid = True
        self.parent_hint: str | None = None
        self.extents: list[Extent] = []  # lines qemu scans as extents
        self.unexpected_lines: list[str] = []
        self.hidden_text = False
        self.disagreements: list[str] = []

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "bytes": self.text_bytes,
            "create-type": self.create_type,
            "extents": [extent.to_json() for extent in self.extents],
        }
        if self.parent_hint is not None:
            out["parent-file-name-hint"] = self.parent_hint
        if self.unexpected_lines:
            out["unexpected-lines"] = self.unexpected_lines
        if self.hidden_text:
            out["hidden-text"] = True
        if self.disagreements:
            out["disagreements"] = self.disagreements
        return out


def _patterns() -> list[re.Pattern[bytes]]:
    """[extent line, strict extent, key=value, hex number], compiled once."""
    if not _COMPILED:
        import re

        _COMPILED.extend(re.compile(source) for source in (_EXTENT_LINE, _STRICT_EXTENT, _KEY_VALUE, _HEX_NUMBER))
    return _COMPILED


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def _qemu_option(text: bytes, name: bytes) -> str | None:
    """qemu's vmdk_parse_description: first occurrence, skip `="`, up to `"`."""
    position = text.find(name)
    if position < 0:
        return None
    start = position + len(name) + 2
    end = text.find(b'"', start)
    if start >= len(text) or end < 0:
        return None
    return _decode(text[start:end])


def _qemu_cid(text: bytes, name: bytes) -> tuple[int | None, bool]:
    """qemu's vmdk_read_cid: first occurrence of the name (`CID` also matches
    inside `parentCID`), skip name+1 chars, scan a hex number. Returns
    (value, valid); qemu refuses to open the image when either is invalid."""
    position = text.find(name)
    if position < 0:
        return None, False  # qemu refuses a descriptor without it ("Invalid argument")
    match = _patterns()[3].match(text, position + len(name) + 1)
    if not match:
        return None, False
    return int(match.group(1)[-8:], 16), True


def _qemu_parent_hint(text: bytes) -> str | None:
    position = text.find(b"parentFileNameHint")
    if position < 0:
        return None
    start = position + len(b"parentFileNameHint") + 2
    end = text.find(b'"', start)
    return _decode(text[start:end]) if end >= 0 else _decode(text[start:])


_QUOTE, _EQUALS, _HASH = ord('"'), ord("="), ord("#")
# The `key=value` lines whose plain reading is compared with qemu's.
_STRICT_KEYS = frozenset({b"createType", b"CID", b"parentFileNameHint"})


def parse(region: bytes) -> Descriptor:
    """Read a descriptor region (NUL-terminated text, then padding)."""
    nul = region.find(b"\0")
    text = region if nul < 0 else region[:nul]
    descriptor = Descriptor(text_bytes=len(text))
    descriptor.hidden_text = nul >= 0 and nonzero_from(region, nul)
    descriptor.create_type = _qemu_option(text, b"createType")
    descriptor.cid, cid_valid = _qemu_cid(text, b"CID")
    descriptor.parent_cid, parent_valid = _qemu_cid(text, b"parentCID")
    descriptor.cid_valid = cid_valid and parent_valid
    descriptor.parent_hint = _qemu_parent_hint(text)

    strict_values: dict[bytes, str] = {}
    extent_line, strict_extent, key_value, _ = _patterns()
    # The patterns cost microseconds a line; the plain tests before them skip
    # only lines they cannot match (each needs a quote, or an `=`). The bytes
    # are looked up as ints: `b'"' in line` raises and clears a TypeError inside.
    # `_decode` written out: a call per field is a good part of a line's cost.
    for raw_line in text.split(b"\n"):
        line = raw_line.rstrip(b"\r")
        # A `key = value` line is tried first: its first word is followed by
        # `=`, so it scans as no extent (`word number`) and is no comment or
        # strict extent either; most lines are such pairs, and they are done
        # with one pattern instead of three.
        pair = key_value.match(line) if _EQUALS in line else None
        if pair:
            # Only the keys _note_disagreements compares are kept (the first
            # line of each wins); the other pairs' values were decoded for
            # nothing, on every line of every descriptor. A key is ASCII
            # (the pattern allows nothing else), so it decodes to itself.
            key = pair.group(1)
            if key in _STRICT_KEYS and key not in strict_values:
                strict_values[key] = pair.group(2).strip(b'"').decode("utf-8", "backslashreplace")
            continue
        quoted = _QUOTE in line
        scanned = extent_line.match(line) if quoted else None
        if scanned:
            if len(descriptor.extents) == MAX_EXTENTS:
                raise FormatError("vmdk", f"descriptor lists more than {MAX_EXTENTS} extents")
            access, sectors, kind, name, offset = scanned.groups()
            descriptor.extents.append(
                Extent(
                    access.decode("utf-8", "backslashreplace"),
                    int(sectors),
                    kind.decode("utf-8", "backslashreplace"),
                    name.decode("utf-8", "backslashreplace"),
                    None if offset is None else int(offset),
                )
            )
        stripped = line.strip()
        if not stripped or stripped[0] == _HASH:
            continue
        if quoted and strict_extent.match(line):
            continue
        if len(descriptor.unexpected_lines) < MAX_REPORTED_LINES:
            descriptor.unexpected_lines.append(_decode(line[:120]))
    _note_disagreements(descriptor, strict_values)
    return descriptor


def _note_disagreements(descriptor: Descriptor, strict_values: dict[bytes, str]) -> None:
    """Where qemu's reading of the text differs from its plain lines."""
    if b"createType" in strict_values and strict_values[b"createType"] != descriptor.create_type:
        descriptor.disagreements.append(
            f"qemu reads createType {descriptor.create_type!r}, its line says {strict_values[b'createType']!r}"
        )
    if b"CID" in strict_values:
        try:
            if int(strict_values[b"CID"], 16) != descriptor.cid:
                descriptor.disagreements.append("qemu reads a different CID than the CID line")
        except ValueError:
            descriptor.disagreements.append("the CID line is not a hex number")
    if descriptor.parent_hint is not None and strict_values.get(b"parentFileNameHint") != descriptor.parent_hint:
        descriptor.disagreements.append("qemu reads a parentFileNameHint that no line states plainly")


def probe_text(buffer: bytes) -> bool:
    """qemu's text probe: comment lines and space-only lines may come first,
    then exactly `version=1|2|3` and a line end."""
    position = 0
    end = len(buffer)
    while position < end:
        char = buffer[position]
        if char == 0x23:  # '#': skip the comment line
            newline = buffer.find(b"\n", position)
            if newline < 0:
                return False
            position = newline + 1
            continue
        if char == 0x20:  # a line of spaces (optionally \r) before the version line
            while position < end and buffer[position] == 0x20:
                position += 1
            if position < end and buffer[position] == 0x0D:
                position += 1
            if position == end or buffer[position] != 0x0A:
                return False
            position += 1
            continue
        rest = buffer[position : position + 11]
        return any(rest.startswith(b"version=%d\n" % v) or rest.startswith(b"version=%d\r\n" % v) for v in (1, 2, 3))
    return False
