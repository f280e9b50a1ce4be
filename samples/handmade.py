"""Read-only legacy formats qemu-img cannot create, built byte by byte:
a Bochs growing redolog, a cloop (compressed loopback) image and an Apple
UDIF (.dmg) image. Layouts follow qemu's block/bochs.c, cloop.c and dmg.c.

qemu has no block-status call for these drivers (its map calls every byte
data), so `allocated` is None.
"""

from __future__ import annotations

import plistlib
import struct
import uuid
import zlib

from samples.data import DISK_UUID, seeded, text_block
from samples.manifest import Sample
from samples.recipe import Context, RecipeList

RECIPES = RecipeList()

KIB = 1 << 10
MIB = 1 << 20


def _sample(name: str, rel: str, fmt: str, size: int, description: str) -> Sample:
    return Sample(
        name=name, file=rel, format=fmt, disk_format=fmt, virtual_size=size, allocated=None, description=description
    )


# --- Bochs ------------------------------------------------------------------

BOCHS_HEADER = 512
BOCHS_EXTENT = 32 * KIB  # a power of two >= 512, as qemu requires


def bochs_image(disk_size: int, extents: dict[int, bytes]) -> bytes:
    """Growing redolog: header, catalog (u32 per extent, 0xFFFFFFFF = absent),
    then per allocated extent a sector bitmap block and the extent data."""
    catalog_entries = -(-disk_size // BOCHS_EXTENT)
    bitmap_size = BOCHS_EXTENT // 512 // 8  # one bit per sector
    header = bytearray(BOCHS_HEADER)
    header[0:32] = b"Bochs Virtual HD Image".ljust(32, b"\0")
    header[32:48] = b"Redolog".ljust(16, b"\0")
    header[48:64] = b"Growing".ljust(16, b"\0")
    struct.pack_into(
        "<IIIIIIQ", header, 64, 0x00020000, BOCHS_HEADER, catalog_entries, bitmap_size, BOCHS_EXTENT, 0, disk_size
    )
    catalog = [0xFFFFFFFF] * catalog_entries
    blocks = bytearray()
    for index, (extent, data) in enumerate(sorted(extents.items())):
        catalog[extent] = index
        bitmap = (b"\xff" * bitmap_size).ljust(512, b"\0")  # every sector of the extent present
        blocks += bitmap + data.ljust(BOCHS_EXTENT, b"\0")
    return bytes(header) + struct.pack(f"<{catalog_entries}I", *catalog) + bytes(blocks)


@RECIPES.add("bochs-growing", quick=True)
def bochs(ctx: Context) -> Sample:
    size = 8 * MIB
    rel = "bochs/bochs-growing.img"
    data = bochs_image(size, {0: text_block(BOCHS_EXTENT, "bochs"), 100: seeded(BOCHS_EXTENT, seed=100)})
    ctx.out(rel).write_bytes(data)
    return _sample("bochs-growing", rel, "bochs", size, "Bochs growing redolog v2, 32 KiB extents, two allocated")


# --- cloop ------------------------------------------------------------------

CLOOP_PREAMBLE = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
CLOOP_BLOCK = 64 * KIB


def cloop_image(blocks: list[bytes]) -> bytes:
    """Preamble padded to 128, u32be block size, u32be block count, n+1 u64be
    absolute offsets, then each block deflated with a zlib header."""
    compressed = [zlib.compress(block.ljust(CLOOP_BLOCK, b"\0"), 9) for block in blocks]
    offset = 128 + 8 + 8 * (len(blocks) + 1)
    offsets = [offset]
    for chunk in compressed:
        offset += len(chunk)
        offsets.append(offset)
    head = CLOOP_PREAMBLE.ljust(128, b"\0") + struct.pack(">II", CLOOP_BLOCK, len(blocks))
    return head + struct.pack(f">{len(offsets)}Q", *offsets) + b"".join(compressed)


@RECIPES.add("cloop-v2", quick=True)
def cloop(ctx: Context) -> Sample:
    blocks = [text_block(CLOOP_BLOCK, "cloop"), b"", seeded(CLOOP_BLOCK, seed=3), text_block(1000, "last")]
    rel = "cloop/cloop-v2.cloop"
    ctx.out(rel).write_bytes(cloop_image(blocks))
    return _sample(
        "cloop-v2",
        rel,
        "cloop",
        len(blocks) * CLOOP_BLOCK,
        "cloop V2.0 with four 64 KiB zlib blocks (probe score 2: the shell preamble)",
    )


# --- dmg (Apple UDIF) -------------------------------------------------------

UDZE, UDRW, UDZO, UDLE = 0x00000000, 0x00000001, 0x80000005, 0xFFFFFFFF


def mish(sectors: int, chunks: list[tuple[int, int, int, int, int]]) -> bytes:
    """BLKX table: 204-byte header then 40-byte chunks (type, comment,
    first sector, sector count, data-fork offset, length)."""
    header = struct.pack(">4sIQQQII24x", b"mish", 1, 0, sectors, 0, 0x208, 0)
    header += bytes(136)  # UDIF checksum: type 0 (none); qemu does not check it
    header += struct.pack(">I", len(chunks))
    return header + b"".join(
        struct.pack(">IIQQQQ", kind, 0, first, count, offset, length) for kind, first, count, offset, length in chunks
    )


def koly(data_length: int, xml_offset: int, xml_length: int, sectors: int) -> bytes:
    """The 512-byte UDIF trailer; qemu reads data fork offset (0x18), resource
    fork (0x28/0x30), XML plist (0xD8/0xE0) and sector count (0x1EC)."""
    trailer = bytearray(512)
    struct.pack_into(
        ">4sIIIQQQQQII16s", trailer, 0, b"koly", 4, 512, 1, 0, 0, data_length, 0, 0, 1, 1, uuid.UUID(DISK_UUID).bytes
    )
    struct.pack_into(">QQ", trailer, 0xD8, xml_offset, xml_length)
    struct.pack_into(">IQ", trailer, 0x1E8, 1, sectors)  # image variant 1 (device image), sector count
    return bytes(trailer)


def dmg_image(total_sectors: int) -> bytes:
    zlib_part = zlib.compress(text_block(64 * 512, "dmg zlib chunk"), 9)
    raw_part = seeded(8 * 512, seed=512)
    data_fork = zlib_part + raw_part
    chunks = [
        (UDZO, 0, 64, 0, len(zlib_part)),
        (UDRW, 64, 8, len(zlib_part), len(raw_part)),
        (UDZE, 72, total_sectors - 72, len(data_fork), 0),
        (UDLE, total_sectors, 0, len(data_fork), 0),
    ]
    blkx = {
        "Attributes": "0x0050",
        "CFName": "whole disk (Apple_HFS : 0)",
        "Data": mish(total_sectors, chunks),
        "ID": "0",
        "Name": "whole disk (Apple_HFS : 0)",
    }
    xml = plistlib.dumps({"resource-fork": {"blkx": [blkx]}}, sort_keys=True)
    return data_fork + xml + koly(len(data_fork), len(data_fork), len(xml), total_sectors)


@RECIPES.add("dmg-udif", quick=True)
def dmg(ctx: Context) -> Sample:
    sectors = 2048
    rel = "dmg/dmg-udif.dmg"
    ctx.out(rel).write_bytes(dmg_image(sectors))
    return _sample(
        "dmg-udif", rel, "dmg", sectors * 512, "UDIF .dmg: zlib, raw and zero-fill chunks in a blkx plist, koly trailer"
    )
