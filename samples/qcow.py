"""qcow2 and qcow (v1) images made with qemu-img and filled with qemu-io.

Not made, because qemu-img 7.2 refuses: 512-byte clusters at 1 TiB ("image
size is too large": the L1 table would need 32 Mi entries, over the 4 Mi
limit), extended L2 with clusters below 16 KiB, qcow v1 with any cluster
size but its default (it has no cluster_size option).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from samples import tools
from samples.data import SECRET, at_both_ends, patch, seeded, sparse_file, text_block
from samples.manifest import Sample
from samples.recipe import Context, Recipe, RecipeList
from samples.tools import Write

RECIPES = RecipeList()

KIB = 1 << 10
MIB = 1 << 20
TIB = 1 << 40
SIZE = 64 * MIB  # default virtual size: big enough for writes far apart, still tiny on disk


def _spread(size: int) -> tuple[Write, ...]:
    """Data at the start, a small unaligned write in the middle and at the end:
    the middle one shows the allocation granularity (cluster or subcluster)."""
    return ((0, 64 * KIB, 0x11), (MIB + 8 * KIB, 4 * KIB, 0x22), (size - 64 * KIB, 64 * KIB, 0x33))


@dataclass(frozen=True, slots=True)
class Spec:
    name: str
    description: str
    options: str = ""
    size: int = SIZE
    granule: int = 64 * KIB  # what one written byte allocates in `qemu-img map`
    writes: tuple[Write, ...] | None = None  # None: `_spread(size)`
    fully_allocated: bool = False  # preallocation: map reports everything as data
    quick: bool = False
    fmt: str = "qcow2"


SPECS = (
    Spec("qcow2-v2-c64k", "compat 0.10 (version 2 header, 72 bytes), 64 KiB clusters", "compat=0.10", quick=True),
    Spec("qcow2-v3-c64k", "compat 1.1, qemu defaults: the common case", "compat=1.1", quick=True),
    Spec("qcow2-v3-c512", "smallest cluster size (cluster_bits 9)", "cluster_size=512", granule=512),
    Spec("qcow2-v3-c4k", "4 KiB clusters", "cluster_size=4096", granule=4 * KIB),
    Spec("qcow2-v3-c2m", "largest cluster size (cluster_bits 21)", "cluster_size=2M", granule=2 * MIB),
    Spec("qcow2-v3-c64k-lazy", "lazy_refcounts=on (compatible feature bit 0)", "lazy_refcounts=on"),
    Spec(
        "qcow2-v3-c64k-extl2",
        "extended L2 entries (incompatible bit 4): 2 KiB subclusters",
        "extended_l2=on",
        granule=2 * KIB,
    ),
    Spec(
        "qcow2-v3-c2m-extl2",
        "extended L2 with 2 MiB clusters: 64 KiB subclusters",
        "extended_l2=on,cluster_size=2M",
        granule=64 * KIB,
    ),
    Spec(
        "qcow2-v3-zstd",
        "compression_type=zstd header field (incompatible bit 3), no compressed clusters",
        "compression_type=zstd",
    ),
    Spec(
        "qcow2-prealloc-metadata",
        "preallocation=metadata: every L2 entry set, map reports all as data",
        "preallocation=metadata",
        size=16 * MIB,
        writes=(),
        fully_allocated=True,
    ),
    Spec(
        "qcow2-prealloc-falloc",
        "preallocation=falloc (small: the host blocks are really reserved)",
        "preallocation=falloc",
        size=2 * MIB,
        writes=(),
        fully_allocated=True,
    ),
    Spec(
        "qcow2-prealloc-full",
        "preallocation=full (small: zeros are really written)",
        "preallocation=full",
        size=2 * MIB,
        writes=(),
        fully_allocated=True,
    ),
    Spec("qcow2-size-0", "virtual size 0 (qemu-img create accepts it)", size=0, writes=()),
    Spec("qcow2-size-1m", "virtual size 1 MiB, one L2 table", size=MIB, writes=((0, 4 * KIB, 0x44),)),
    Spec(
        "qcow2-size-1000000",
        "odd size 1000000: qemu-img create rounds it up to 1000448 in the header",
        size=1_000_000,
        writes=((0, 4 * KIB, 0x55),),
    ),
    Spec(
        "qcow2-1t-c64k",
        "1 TiB virtual, 64 KiB clusters, data at both ends",
        size=TIB,
        writes=at_both_ends(TIB, 0x66, 0x67),
    ),
    Spec(
        "qcow2-1t-c2m",
        "1 TiB virtual, 2 MiB clusters",
        "cluster_size=2M",
        size=TIB,
        granule=2 * MIB,
        writes=at_both_ends(TIB, 0x68, 0x69),
    ),
    Spec(
        "qcow2-data-offsets",
        "data at several offsets, one write straddling a cluster boundary",
        size=SIZE,
        writes=(
            (0, 512, 0x71),
            (64 * KIB - 512, 1 * KIB, 0x72),
            (10 * MIB, 200 * KIB, 0x73),
            (33 * MIB + 3 * 512, 512, 0x74),
            (SIZE - 4 * KIB, 4 * KIB, 0x75),
        ),
    ),
    Spec(
        "qcow-v1",
        "qcow version 1 (format qcow), 4 KiB clusters",
        size=16 * MIB,
        granule=4 * KIB,
        fmt="qcow",
        quick=True,
    ),
)


def _build(spec: Spec, ctx: Context) -> Sample:
    ext = "qcow" if spec.fmt == "qcow" else "qcow2"
    rel = f"{spec.fmt}/{spec.name}.{ext}"
    path = ctx.out(rel)
    writes = _spread(spec.size) if spec.writes is None else spec.writes
    tools.create(path, spec.fmt, spec.size, spec.options)
    tools.write(path, spec.fmt, writes)
    if not spec.fully_allocated:
        tools.dig_holes(path)  # 2 MiB clusters are written whole, mostly zeros
    size = -(-spec.size // 512) * 512  # qemu-img create rounds the request up to 512
    return Sample(
        name=spec.name,
        file=rel,
        format=spec.fmt,
        disk_format=spec.fmt,
        virtual_size=size,
        allocated=size if spec.fully_allocated else tools.covered(writes, spec.granule, size),
        description=spec.description,
    )


def _recipe(spec: Spec) -> Recipe:
    return Recipe(spec.name, lambda ctx: _build(spec, ctx), spec.quick)


RECIPES += [_recipe(spec) for spec in SPECS]


@RECIPES.add("qcow2-size-1000000-header")
def odd_header(ctx: Context) -> Sample:
    """qemu-img never writes a size that is not a multiple of 512, other tools
    may: qemu then rounds the header size *down* (1000000 → 999936)."""
    rel = "qcow2/qcow2-size-1000000-header.qcow2"
    path = ctx.out(rel)
    tools.create(path, "qcow2", 1_000_000)
    patch(path, 24, struct.pack(">Q", 1_000_000))  # the u64be size field
    return Sample(
        name="qcow2-size-1000000-header",
        file=rel,
        format="qcow2",
        disk_format="qcow2",
        virtual_size=999_936,
        allocated=0,
        description="header size field 1000000 (not a sector multiple): qemu reports it rounded down",
    )


def _source_extents() -> list[tuple[int, bytes]]:
    """Raw content for `convert -c`: text (compresses well) and random bytes
    (qemu stores clusters that do not shrink uncompressed)."""
    return [
        (0, text_block(MIB, "compressed cluster")),
        (4 * MIB, seeded(512 * KIB, seed=4)),
        (15 * MIB, text_block(64 * KIB, "tail")),
    ]


def _compressed(name: str, compression: str) -> Recipe:
    def build(ctx: Context) -> Sample:
        source = sparse_file(ctx.tmp("source.raw"), 16 * MIB)
        extents = _source_extents()
        with source.open("r+b") as raw:
            for offset, data in extents:
                raw.seek(offset)
                raw.write(data)
        rel = f"qcow2/{name}.qcow2"
        path = ctx.out(rel)
        tools.qemu_img(
            "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"compression_type={compression}", source, path
        )
        return Sample(
            name=name,
            file=rel,
            format="qcow2",
            disk_format="qcow2",
            virtual_size=16 * MIB,
            allocated=tools.covered([(off, len(data), 0) for off, data in extents], 64 * KIB, 16 * MIB),
            description=f"qemu-img convert -c with {compression}: compressed cluster descriptors in L2",
        )

    return Recipe(name, build)


RECIPES += [_compressed("qcow2-compressed-zlib", "zlib"), _compressed("qcow2-compressed-zstd", "zstd")]


@RECIPES.add("qcow2-bitmap")
def with_bitmap(ctx: Context) -> Sample:
    rel = "qcow2/qcow2-bitmap.qcow2"
    path = ctx.out(rel)
    writes = _spread(SIZE)
    tools.create(path, "qcow2", SIZE)
    tools.write(path, "qcow2", writes)
    tools.qemu_img("bitmap", "--add", "-f", "qcow2", path, "b0")
    return Sample(
        name="qcow2-bitmap",
        file=rel,
        format="qcow2",
        disk_format="qcow2",
        virtual_size=SIZE,
        allocated=tools.covered(writes, 64 * KIB, SIZE),
        description="persistent dirty bitmap (bitmaps header extension, autoclear bit 0)",
    )


@RECIPES.add("qcow2-encrypt-luks")
def encrypted(ctx: Context) -> Sample:
    rel = "qcow2/qcow2-encrypt-luks.qcow2"
    path = ctx.out(rel)
    secret = f"secret,id=s0,data={SECRET}"
    size = 16 * MIB
    # iter-time 10 ms: the key derivation is what makes encrypted images slow.
    tools.create(
        path, "qcow2", size, "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", "--object", secret
    )
    tools.write(
        f"driver=qcow2,file.filename={path},encrypt.key-secret=s0",
        "qcow2",
        ((0, 64 * KIB, 0x77),),
        "--object",
        secret,
        "--image-opts",
    )
    return Sample(
        name="qcow2-encrypt-luks",
        file=rel,
        format="qcow2",
        disk_format="qcow2",
        virtual_size=size,
        allocated=None,  # the payload is ciphertext; the map needs the key
        description="LUKS-encrypted qcow2 (crypt_method 2, encryption header extension), passphrase in data.SECRET",
    )
