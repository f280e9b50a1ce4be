"""VHD (qemu driver `vpc`): dynamic and fixed, and the creator-application
cases where qemu 7.2 sizes a disk by its CHS geometry or by current_size.

docs/formats.md §3.4: qemu 7.2 trusts current_size only for the creators `win `,
`qem2`, `d2v `, `CTXS`, `tap\\0` (or the maximum geometry); every other
creator (`vpc `, `qemu`, `vbox`, Azure's `wa\\0\\0`) is sized by
cylinders × heads × sectors. Tools that write an exact current_size with a
geometry rounded *down* (VirtualBox, Azure) therefore lose the last few
sectors in qemu 7.2; those samples record that (smaller) qemu size.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from samples import tools
from samples.data import DISK_UUID, EPOCH, at_both_ends, read_at
from samples.manifest import Sample
from samples.recipe import Context, Recipe, RecipeList
from samples.tools import Write

RECIPES = RecipeList()

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40
BLOCK = 2 * MIB  # qemu's dynamic VHD block size
MAX_CHS = 65535 * 16 * 255
VHD_EPOCH = 946_684_800  # 2000-01-01T00:00:00Z, the VHD timestamp origin
CURRENT_SIZE_CREATORS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")


def chs_geometry(total_sectors: int) -> tuple[int, int, int]:
    """The VHD specification's CHS algorithm (rounds *down*), as qemu's
    calculate_geometry() implements it."""
    total_sectors = min(total_sectors, MAX_CHS)
    if total_sectors >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total_sectors // spt
    else:
        spt = 17
        cth = total_sectors // spt
        heads = max(4, -(-cth // 1024))
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total_sectors // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total_sectors // spt
    return cth // heads, heads, spt


def qemu_create_size(requested: int) -> int:
    """The virtual size `qemu-img create -f vpc` gives without force_size
    (calculate_rounded_image_size): the request rounded up to a sector, then
    up to the next CHS-representable size; when only the maximum geometry
    covers it, the exact request."""
    requested_sectors = -(-requested // 512)
    total = min(MAX_CHS, requested_sectors)
    cyls = heads = spt = 0
    i = 0
    while total > cyls * heads * spt:
        cyls, heads, spt = chs_geometry(total + i)
        i += 1
    if cyls * heads * spt == MAX_CHS:
        return requested_sectors * 512
    return cyls * heads * spt * 512


def checksum(footer: bytes) -> int:
    """One's complement of the byte sum, with the checksum field zeroed."""
    return ~sum(footer[:64] + bytes(4) + footer[68:512]) & 0xFFFFFFFF


def footer_offsets(path: Path) -> list[int]:
    """Where the footers are: the end only (fixed), or a copy at 0 too (dynamic)."""
    end = path.stat().st_size - 512
    return [0, end] if read_at(path, 0, 8) == b"conectix" else [end]


def rewrite_footers(path: Path, creator: bytes | None = None, geometry: tuple[int, int, int] | None = None) -> None:
    """Patch every footer copy and fix its checksum. Always pins qemu's
    random UUID and current-time timestamp, so the file is reproducible."""
    for offset in footer_offsets(path):
        footer = bytearray(read_at(path, offset, 512))
        if footer[:8] != b"conectix":
            raise ValueError(f"{path}: no VHD footer at {offset}")
        struct.pack_into(">I", footer, 24, EPOCH - VHD_EPOCH)
        footer[68:84] = uuid.UUID(DISK_UUID).bytes
        if creator is not None:
            footer[28:32] = creator
        if geometry is not None:
            struct.pack_into(">HBB", footer, 56, *geometry)
        struct.pack_into(">I", footer, 64, checksum(bytes(footer)))
        with path.open("r+b") as image:
            image.seek(offset)
            image.write(footer)


@dataclass(frozen=True, slots=True)
class Spec:
    """A VHD `qemu-img create -f vpc` makes (fixed or dynamic); its footers get a fixed
    UUID and timestamp, and the creator and geometry another tool writes when `creator` is set."""

    name: str
    description: str
    size: int
    fixed: bool = False
    force_size: bool = False
    creator: bytes | None = None  # patch the creator app and round the geometry down
    writes: tuple[Write, ...] | None = None  # None: `_writes(size)`
    quick: bool = False


def _expected(spec: Spec) -> int:
    if spec.creator is None:
        return spec.size if spec.force_size else qemu_create_size(spec.size)
    if spec.creator in CURRENT_SIZE_CREATORS:
        return spec.size
    cyls, heads, spt = chs_geometry(spec.size // 512)
    return cyls * heads * spt * 512


def _writes(size: int) -> tuple[Write, ...]:
    """64 KiB at the start and 64 KiB at the middle, rounded down to a MiB."""
    return ((0, 64 * KIB, 0x11), (size // 2 // MIB * MIB, 64 * KIB, 0x22))


def _build(spec: Spec, ctx: Context) -> Sample:
    rel = f"vhd/{spec.name}.vhd"
    path = ctx.out(rel)
    options = ["subformat=fixed" if spec.fixed else "subformat=dynamic"]
    # A patched creator starts from an exact current_size (force_size) and then
    # gets the geometry other tools write: the spec's CHS rounded down.
    if spec.force_size or spec.creator is not None:
        options.append("force_size=on")
    tools.create(path, "vpc", spec.size, ",".join(options))
    writes = _writes(spec.size) if spec.writes is None else spec.writes
    tools.write(path, "vpc", writes)
    if spec.creator is not None:
        rewrite_footers(path, spec.creator, chs_geometry(spec.size // 512))
    else:
        rewrite_footers(path)
    size = _expected(spec)
    # Fixed: qemu's map marks host holes `"zero": true` but keeps `"data":
    # true`, so all of it counts. Dynamic: a written byte allocates its block.
    allocated = size if spec.fixed else tools.covered(writes, BLOCK, size)
    return Sample(
        name=spec.name,
        file=rel,
        format="vpc",
        disk_format="vhd",
        virtual_size=size,
        allocated=allocated,
        description=spec.description,
    )


SPECS: tuple[Spec, ...] = (
    Spec("vhd-dynamic", "dynamic VHD (qemu default): 64 MiB rounded up to CHS, creator qemu", 64 * MIB, quick=True),
    Spec(
        "vhd-dynamic-force",
        "dynamic, force_size=on: creator qem2, max geometry, exact current_size 64 MiB + 3 sectors",
        64 * MIB + 1536,
        force_size=True,
    ),
    Spec(
        "vhd-dynamic-1t",
        "1 TiB dynamic: beyond CHS, qemu writes max geometry and sizes by current_size",
        TIB,
        writes=at_both_ends(TIB, 0x11, 0x33),
    ),
    Spec(
        "vhd-fixed-1000m",
        "fixed VHD, 1000 MiB rounded up to CHS (1048707072); footer only at the end",
        1000 * MIB,
        fixed=True,
    ),
    Spec("vhd-fixed-1g", "fixed VHD, 1 GiB rounded up to CHS (1073995776)", GIB, fixed=True),
    Spec("vhd-fixed-10m3s", "fixed VHD, 10 MiB + 3 sectors rounded up to CHS", 10 * MIB + 1536, fixed=True, quick=True),
    Spec(
        "vhd-fixed-force",
        "fixed, force_size=on: creator qem2, exact 10 MiB + 3 sectors",
        10 * MIB + 1536,
        fixed=True,
        force_size=True,
    ),
)

_CREATORS = ((b"vbox", "vbox", "VirtualBox"), (b"wa\0\0", "azure", "Azure"), (b"win ", "win", "Hyper-V"))
SPECS += tuple(
    Spec(
        f"vhd-fixed-{label}",
        f"fixed, creator {creator!r} ({who}): current_size 20 MiB, geometry rounded down; qemu 7.2 sizes by "
        + ("current_size" if creator in CURRENT_SIZE_CREATORS else "CHS"),
        20 * MIB,
        fixed=True,
        creator=creator,
    )
    for creator, label, who in _CREATORS
)
SPECS += tuple(
    Spec(
        f"vhd-dynamic-{label}",
        f"dynamic, creator {creator!r} ({who}): current_size 1 GiB, geometry rounded down; qemu 7.2 sizes by "
        + ("current_size" if creator in CURRENT_SIZE_CREATORS else "CHS"),
        GIB,
        creator=creator,
    )
    for creator, label, who in _CREATORS
)


def _recipe(spec: Spec) -> Recipe:
    return Recipe(spec.name, lambda ctx: _build(spec, ctx), spec.quick)


RECIPES += [_recipe(spec) for spec in SPECS]
