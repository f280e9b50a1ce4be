"""VMDK in every subformat qemu-img writes, plus two it cannot write:
a `vmfs` descriptor (qemu 7.2 has no subformat=vmfs) and a VMware-style
streamOptimized file with the grain directory at the end (GD_AT_END + footer).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

from samples import tools
from samples.data import patch, read_at, seeded, sparse_file, text_block
from samples.manifest import Sample
from samples.recipe import Context, Recipe, RecipeList
from samples.tools import Write

RECIPES = RecipeList()

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
SIZE = 64 * MIB
GRAIN = 64 * KIB
CID = b"CID=5a3c1e2b"  # qemu picks a random content id; pin it
GD_AT_END = 0xFFFFFFFFFFFFFFFF

# qemu's map reports every byte of a FLAT/VMFS extent as data (host holes come
# out as "zero": true, "data": true), so flat samples get allocated = size.
# Their writes stay grain aligned anyway, so that a reader that does look at
# holes finds predictable extents.
ALIGNED: tuple[Write, ...] = ((0, GRAIN, 0x11), (MIB, GRAIN, 0x22), (SIZE - GRAIN, GRAIN, 0x33))
# Unaligned small write in the middle: a sparse extent allocates a whole grain.
SPREAD: tuple[Write, ...] = ((0, GRAIN, 0x11), (MIB + 8 * KIB, 4 * KIB, 0x22), (SIZE - GRAIN, GRAIN, 0x33))


def pin_cid(path: Path) -> None:
    """Replace qemu's random CID (printed with %x: 1 to 8 digits) in a
    descriptor file or an embedded descriptor.

    The descriptor is a C string in a NUL-padded area. When qemu rewrites the
    CID it leaves stale bytes after the new NUL, so everything after the
    first NUL is dropped and the area padded again: qemu never reads it.
    """
    embedded = read_at(path, 0, 4) == b"KDMV"
    if embedded:
        desc_sector, desc_sectors = struct.unpack_from("<QQ", read_at(path, 0, 512), 28)
        if not desc_sector:
            return  # extent without a descriptor (twoGbMaxExtentSparse parts)
        offset, length = desc_sector * 512, desc_sectors * 512
    else:
        offset, length = 0, path.stat().st_size
    area = read_at(path, offset, length)
    text, nul, _stale = area.partition(b"\0")
    text = re.sub(rb"(?m)^CID=[0-9a-fA-F]+", CID, text, count=1)
    if nul:  # a NUL-padded area keeps its size
        if len(text) >= length:
            raise ValueError(f"{path}: descriptor area full")
        text = text.ljust(length, b"\0")
    elif embedded:
        raise ValueError(f"{path}: embedded descriptor without a NUL")
    if embedded:
        patch(path, offset, text)
    else:
        path.write_bytes(text)


def _sample(name: str, rel: str, size: int, allocated: int | None, description: str) -> Sample:
    return Sample(
        name=name,
        file=rel,
        format="vmdk",
        disk_format="vmdk",
        virtual_size=size,
        allocated=allocated,
        description=description,
    )


def _made(
    name: str,
    options: str,
    description: str,
    *,
    size: int = SIZE,
    writes: tuple[Write, ...] = SPREAD,
    extents: tuple[str, ...] = (),
    flat: bool = False,
    quick: bool = False,
) -> Recipe:
    """qemu-img create + qemu-io writes; `extents` are the files qemu adds beside the descriptor."""

    def build(ctx: Context) -> Sample:
        rel = f"vmdk/{name}.vmdk"
        path = ctx.out(rel)
        for extent in extents:
            ctx.out(f"vmdk/{name}{extent}")  # remove stale extents of a previous run
        tools.create(path, "vmdk", size, options)
        tools.write(path, "vmdk", writes)
        pin_cid(path)
        allocated = size if flat else tools.covered(writes, GRAIN, size)
        return _sample(name, rel, size, allocated, description)

    return Recipe(name, build, quick)


RECIPES += [
    _made(
        "vmdk-monolithic-sparse", "", "monolithicSparse (qemu default): KDMV header, embedded descriptor", quick=True
    ),
    _made(
        "vmdk-monolithic-flat",
        "subformat=monolithicFlat",
        "monolithicFlat: text descriptor (the manifest file) + one -flat.vmdk raw extent",
        writes=ALIGNED,
        extents=("-flat.vmdk",),
        flat=True,
    ),
]
# The split layouts: 5 GiB in three extents of at most 2 GiB, data in the first and the last.
RECIPES += [
    _made(
        f"vmdk-2gb-{kind.lower()}",
        f"subformat=twoGbMaxExtent{kind}",
        f"twoGbMaxExtent{kind}, 5 GiB: descriptor + three {extents}",
        size=5 * GIB,
        writes=((0, GRAIN, 0x11), (4 * GIB + 512 * MIB, GRAIN, 0x44)),
        extents=tuple(f"-{kind[0].lower()}{number:03}.vmdk" for number in (1, 2, 3)),
        flat=kind == "Flat",
    )
    for kind, extents in (("Sparse", "-sNNN.vmdk sparse extents"), ("Flat", "sparse -fNNN.vmdk raw extents"))
]
RECIPES += [
    _made(
        "vmdk-stream-empty",
        "subformat=streamOptimized",
        "streamOptimized as qemu-img create writes it: version 3, compressed, no grains",
        writes=(),
    ),
]


@RECIPES.add("vmdk-zeroed-grain")
def zeroed_grain(ctx: Context) -> Sample:
    rel = "vmdk/vmdk-zeroed-grain.vmdk"
    path = ctx.out(rel)
    tools.create(path, "vmdk", SIZE, "zeroed_grain=on")
    tools.write(path, "vmdk", SPREAD)
    # A zero write marks the grain table entries as zeroed (GTE 1): not data.
    tools.run(["qemu-io", "-f", "vmdk", "-c", f"write -z {2 * MIB} {4 * GRAIN}", path])
    pin_cid(path)
    return _sample(
        "vmdk-zeroed-grain",
        rel,
        SIZE,
        tools.covered(SPREAD, GRAIN, SIZE),
        "zeroed_grain=on (version 2, flag bit 2) with zeroed-grain GT entries",
    )


def _stream_source(ctx: Context) -> tuple[Path, tuple[Write, ...]]:
    """A raw disk with text and random data for `convert -O vmdk streamOptimized`."""
    source = sparse_file(ctx.tmp("stream-source.raw"), SIZE)
    extents = [
        (0, text_block(256 * KIB, "stream")),
        (8 * MIB, seeded(128 * KIB, seed=8)),
        (SIZE - GRAIN, text_block(GRAIN, "end")),
    ]
    with source.open("r+b") as raw:
        for offset, data in extents:
            raw.seek(offset)
            raw.write(data)
    return source, tuple((offset, len(data), 0) for offset, data in extents)


def _convert_stream(ctx: Context, path: Path) -> int:
    source, writes = _stream_source(ctx)
    tools.qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", source, path)
    pin_cid(path)
    return tools.covered(writes, GRAIN, SIZE)


@RECIPES.add("vmdk-stream-data", quick=True)
def stream_converted(ctx: Context) -> Sample:
    rel = "vmdk/vmdk-stream-data.vmdk"
    allocated = _convert_stream(ctx, ctx.out(rel))
    return _sample(
        "vmdk-stream-data", rel, SIZE, allocated, "streamOptimized from qemu-img convert: deflate-compressed grains"
    )


def vmware_footer(path: Path) -> None:
    """Rewrite a qemu streamOptimized file the way VMware lays it out.

    qemu keeps the grain directory offset in the head header; VMware writes
    GD_AT_END there and appends footer marker + header copy (with the real
    offset) + end-of-stream marker, which is the layout qemu must parse from
    the tail (docs/formats.md §6.3).
    """
    size = path.stat().st_size
    if size % 512 or read_at(path, size - 512, 512) != bytes(512):
        raise ValueError(f"{path}: expected qemu's end-of-stream marker at the end")
    header = read_at(path, 0, 512)
    footer_marker = struct.pack("<QII", 1, 0, 3).ljust(512, b"\0")  # 1 sector follows; size 0; type 3 footer
    end_of_stream = bytes(512)  # val 0, size 0, type 0
    with path.open("r+b") as image:
        image.truncate(size - 512)
        image.seek(size - 512)
        image.write(footer_marker + header + end_of_stream)
        image.seek(56)
        image.write(struct.pack("<Q", GD_AT_END))


@RECIPES.add("vmdk-stream-vmware")
def stream_vmware(ctx: Context) -> Sample:
    rel = "vmdk/vmdk-stream-vmware.vmdk"
    path = ctx.out(rel)
    allocated = _convert_stream(ctx, path)
    vmware_footer(path)
    return _sample(
        "vmdk-stream-vmware",
        rel,
        SIZE,
        allocated,
        "VMware-style streamOptimized: header GD offset GD_AT_END, footer header copy before the end-of-stream marker",
    )


@RECIPES.add("vmdk-vmfs")
def vmfs(ctx: Context) -> Sample:
    """ESXi's flat layout: createType vmfs and a VMFS extent (no offset field)."""
    rel = "vmdk/vmdk-vmfs.vmdk"
    extent = "vmdk-vmfs-flat.vmdk"
    sparse_file(ctx.out(f"vmdk/{extent}"), SIZE, ALIGNED)
    descriptor = f"""# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=5a3c1e2b
parentCID=ffffffff
createType="vmfs"

# Extent description
RW {SIZE // 512} VMFS "{extent}"

# The Disk Data Base
#DDB

ddb.adapterType = "lsilogic"
ddb.geometry.cylinders = "8"
ddb.geometry.heads = "255"
ddb.geometry.sectors = "63"
ddb.longContentID = "0d1e2f3a4b5c6d7e8f9a0b1c5a3c1e2b"
ddb.uuid = "60 00 C2 9a 3c 1e 2b 7d-4f 4a 8e 9b 6c 0d 1e 2f"
ddb.virtualHWVersion = "14"
"""
    ctx.out(rel).write_text(descriptor, encoding="ascii")
    return _sample(
        "vmdk-vmfs",
        rel,
        SIZE,
        SIZE,
        "hand-written ESXi vmfs descriptor + raw VMFS extent (qemu-img cannot create subformat=vmfs)",
    )
