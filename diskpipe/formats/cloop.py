"""cloop compressed loop images (`format: cloop`): detected and named, refused
by the default policy. docs/formats.md §14; qemu block/cloop.c."""

from __future__ import annotations

from diskpipe.formats.base import ContainerFormat, InspectOptions
from diskpipe.formats.errors import FormatError
from diskpipe.formats.info import Facts
from diskpipe.formats.layout import Layout

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from diskpipe.formats.base import Inspection

NAME = "cloop"
PREAMBLE = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
HEADER = Layout(NAME, "header", ">", "128 I block_size, 132 I n_blocks")
MAX_BLOCK_SIZE = 64 * 1024 * 1024
MAX_OFFSETS_BYTES = 512 * 1024 * 1024


def probe(buffer: bytes) -> bool:
    return buffer.startswith(PREAMBLE)


def inspect(head: bytes, options: InspectOptions) -> Inspection:
    header = HEADER.parse(head)
    block_size, n_blocks = header["block_size"], header["n_blocks"]
    if block_size == 0 or block_size % 512 or block_size > MAX_BLOCK_SIZE:
        raise FormatError(NAME, f"invalid block_size {block_size}", field="block_size", offset=128)
    if (n_blocks + 1) * 8 > MAX_OFFSETS_BYTES:
        raise FormatError(NAME, "image requires too many offsets", field="n_blocks", offset=132)
    return Facts(format=NAME, virtual_size=n_blocks * block_size, dirty=None, details={"anomalies": []})
    yield  # pragma: no cover - makes this a generator like every inspector


FORMAT = ContainerFormat(NAME, probe, inspect)
