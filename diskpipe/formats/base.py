"""The interface every format implements.

A *container* format is one qemu opens with `-f <name>`: its inspector probes
the first 2048 bytes the way qemu's probe does, then yields read requests
(see `reads`) and returns `Facts`. A *content* sniffer recognises what lies
inside raw data (ISO, partition tables, filesystems, kernels, ramdisks) from
the retained head bytes alone and returns a `Content`.
"""

from __future__ import annotations

from diskpipe.formats.reads import Read

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from collections.abc import Callable, Generator
    from typing import Any, NamedTuple

    from diskpipe.formats.info import Content, Facts
    from diskpipe.formats.reads import Request

    Inspection = Generator[Request, Any, Facts]
    # A content sniffer looks at the retained head bytes alone.
    ContentSniffer = Callable[[bytes], Content | None]
else:
    from diskpipe.formats.tuples import NamedTuple

# qemu's probe buffer (BLOCK_PROBE_BUF_SIZE): probes see only these bytes.
PROBE_SIZE = 2048


class InspectOptions(NamedTuple):
    """What an inspection should read beyond headers and footers."""

    # Read allocation tables (qcow2 L1/L2, BATs, grain tables, block maps).
    allocation: bool = False


class ContainerFormat(NamedTuple):
    name: str  # the qemu driver name, passed as `-f`
    probe: Callable[[bytes], bool]  # on the zero-padded 2048-byte probe buffer
    inspect: Callable[[bytes, InspectOptions], Inspection]  # head bytes -> Facts


def read_exact(offset: int, length: int, head: bytes) -> Generator[Request, Any, bytes]:
    """Bytes at [offset, offset+length), from the head when it holds them.

    Returns fewer bytes at end of data; callers decide whether that is an
    error (qemu itself reads zeros past the end).
    """
    if offset + length <= len(head):
        return head[offset : offset + length]
    data: bytes = yield Read(offset, length)
    return data
