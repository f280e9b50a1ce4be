"""Deterministic payloads and small file helpers shared by the recipes."""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from samples.manifest import Sample
from samples.tools import Write

if TYPE_CHECKING:
    from samples.recipe import Context

# Fixed identifiers: the same run on any machine gives the same bytes where the
# tools let us choose (UUIDs, timestamps, seeds).
EPOCH = 1_700_000_000  # 2023-11-14T22:13:20Z, used for every timestamp we can set
DISK_UUID = "5a3c1e2b-7d4f-4a8e-9b6c-0d1e2f3a4b5c"
PART_UUIDS = ("6b4d2f3c-8e5a-4b9f-8c7d-1e2f3a4b5c6d", "7c5e3a4d-9f6b-4cab-8d8e-2f3a4b5c6d7e")
FS_UUID = "8d6f4b5e-a07c-4dbc-9e9f-3a4b5c6d7e8f"
SECRET = "diskpipe-sample"  # passphrase of every encrypted sample


def seeded(size: int, seed: int) -> bytes:
    """Incompressible but reproducible bytes."""
    return random.Random(seed).randbytes(size)


def text_block(size: int, label: str) -> bytes:
    """Compressible, human-readable filler (so compressed samples stay small)."""
    line = f"diskpipe sample data: {label}\n".encode()
    return (line * (size // len(line) + 1))[:size]


def at_both_ends(size: int, first: int, last: int) -> tuple[Write, ...]:
    """64 KiB of `first` at the start and 64 KiB of `last` at the very end of a
    `size`-byte disk (the two places a large sparse image must map right)."""
    head = 64 * 1024
    return ((0, head, first), (size - head, head, last))


def sparse_file(path: Path, size: int, writes: Iterable[Write] = ()) -> Path:
    """A sparse raw file of `size` bytes with pattern-filled extents."""
    with path.open("wb") as out:
        out.truncate(size)
        for offset, length, pattern in writes:
            out.seek(offset)
            out.write(bytes([pattern]) * length)
    return path


def patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as out:
        out.seek(offset)
        out.write(data)


def read_at(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as src:
        src.seek(offset)
        return src.read(length)


def sectors(size: int) -> int:
    """Size rounded up to whole 512-byte sectors (qemu's raw virtual size)."""
    return -(-size // 512) * 512


def written_raw_sample(
    ctx: Context, name: str, rel: str, data: bytes, *, disk_format: str, contents: list[str], description: str
) -> Sample:
    """Write `data` as the whole sample file: raw, padded by qemu to whole
    sectors, every byte written (no holes)."""
    ctx.out(rel).write_bytes(data)
    return Sample(
        name=name,
        file=rel,
        format="raw",
        disk_format=disk_format,
        contents=contents,
        virtual_size=sectors(len(data)),
        allocated=len(data),
        description=description,
    )
