"""VHDX, VDI, QED and Parallels images made with qemu-img and qemu-io.

qemu writes random identifiers into VHDX and VDI headers; `pin_vhdx` and
`pin_vdi` overwrite them with fixed ones (fixing the VHDX header CRCs) so a
rerun gives the same bytes.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import google_crc32c

from samples import tools
from samples.data import DISK_UUID, PART_UUIDS, at_both_ends, patch, read_at
from samples.manifest import Sample
from samples.recipe import Context, Recipe, RecipeList
from samples.tools import Write

RECIPES = RecipeList()

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40
SIZE = 64 * MIB

VHDX_METADATA_REGION = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
VHDX_PAGE83 = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")


def pin_vhdx(path: Path) -> None:
    """Fixed file/data write GUIDs in both headers (CRC-32C redone), a fixed
    page-83 disk id in the metadata region, and no stale log entries.

    qemu journals its BAT updates in the log under a random log GUID, then
    clears the header's log GUID on close; the entries left behind are
    ignored by every reader, so they are zeroed (as in a fresh image)."""
    headers = [bytearray(read_at(path, offset, 4 * KIB)) for offset in (64 * KIB, 128 * KIB)]
    if any(any(header[48:64]) for header in headers):
        raise ValueError(f"{path}: the log is live, it must not be touched")
    log_length, log_offset = struct.unpack_from("<IQ", headers[0], 68)
    patch(path, log_offset, bytes(log_length))
    # qemu starts the sequence numbers at a random value; keep only their order
    # (the higher one marks the current header).
    sequences = [struct.unpack_from("<Q", header, 8)[0] for header in headers]
    for header, sequence in zip(headers, sequences, strict=True):
        struct.pack_into("<Q", header, 8, 10 + sorted(set(sequences)).index(sequence))
    for offset, header in zip((64 * KIB, 128 * KIB), headers, strict=True):
        header[16:32] = uuid.UUID(PART_UUIDS[0]).bytes_le  # file_write_guid
        header[32:48] = uuid.UUID(PART_UUIDS[1]).bytes_le  # data_write_guid
        header[4:8] = bytes(4)
        header[4:8] = struct.pack("<I", google_crc32c.value(bytes(header)))
        patch(path, offset, bytes(header))
    regions = read_at(path, 192 * KIB, 64 * KIB)
    (count,) = struct.unpack_from("<I", regions, 8)
    for index in range(count):
        guid, offset, _length, _flags = struct.unpack_from("<16sQII", regions, 16 + 32 * index)
        if uuid.UUID(bytes_le=guid) != VHDX_METADATA_REGION:
            continue
        table = read_at(path, offset, 64 * KIB)
        (entries,) = struct.unpack_from("<H", table, 10)
        for item in range(entries):
            item_guid, item_offset = struct.unpack_from("<16sI", table, 32 + 32 * item)
            if uuid.UUID(bytes_le=item_guid) == VHDX_PAGE83:
                patch(path, offset + item_offset, uuid.UUID(DISK_UUID).bytes_le)


def pin_vdi(path: Path) -> None:
    """Fixed image and modification UUIDs (no checksum in a VDI header)."""
    patch(path, 0x188, uuid.UUID(DISK_UUID).bytes + uuid.UUID(PART_UUIDS[0]).bytes)


# qemu 7.2's vhdx driver has no block-status call: `qemu-img map` reports the
# whole disk as data whatever the BAT says, so its sum means nothing.
NO_BLOCK_STATUS = {"vhdx"}
PINNERS = {"vhdx": pin_vhdx, "vdi": pin_vdi}
EXTENSIONS = {"vhdx": "vhdx", "vdi": "vdi", "qed": "qed", "parallels": "hds"}
GLANCE = {"vhdx": "vhdx", "vdi": "vdi", "qed": "qed", "parallels": "ploop"}


def _spread(size: int) -> tuple[Write, ...]:
    return ((0, 64 * KIB, 0x11), (size // 2, 4 * KIB, 0x22), (size - 64 * KIB, 64 * KIB, 0x33))


@dataclass(frozen=True, slots=True)
class Spec:
    """A sample `qemu-img create` makes in format `fmt`, then qemu-io fills with `writes`."""

    name: str
    fmt: str
    description: str
    size: int = SIZE
    options: str = ""
    granule: int = 0  # allocation unit of `qemu-img map`; 0: map sums to the virtual size
    writes: tuple[Write, ...] | None = None  # None: `_spread(size)`
    virtual_size: int | None = None  # None: `size`
    quick: bool = False


def _one_tib(name: str, fmt: str, description: str, granule: int = 0) -> Spec:
    """1 TiB of virtual disk with data at both ends: tables at their largest, the last block mapped."""
    return Spec(name, fmt, description, size=TIB, granule=granule, writes=at_both_ends(TIB, 0x11, 0x33))


SPECS = (
    Spec("vhdx-dynamic", "vhdx", "dynamic VHDX (qemu default, 8 MiB blocks)", quick=True),
    Spec(
        "vhdx-fixed",
        "vhdx",
        "fixed VHDX (small: every block is fully present)",
        size=8 * MIB,
        options="subformat=fixed",
        writes=(),
    ),
    Spec("vhdx-bs1m", "vhdx", "dynamic VHDX, smallest block size 1 MiB", options="block_size=1M"),
    Spec("vhdx-bs32m", "vhdx", "dynamic VHDX, 32 MiB blocks", options="block_size=32M"),
    _one_tib("vhdx-1t", "vhdx", "1 TiB dynamic VHDX (qemu picks 32 MiB blocks)"),
    Spec("vdi-dynamic", "vdi", "dynamic VDI (1 MiB blocks)", granule=MIB, quick=True),
    Spec(
        "vdi-static",
        "vdi",
        "static (preallocated) VDI, small",
        size=4 * MIB,
        options="static=on",
        writes=((0, 64 * KIB, 0x11),),
    ),
    Spec(
        "vdi-size-1000000",
        "vdi",
        "VDI of odd size 1000000: qemu-img create rounds the request up to 1000448",
        size=1_000_000,
        granule=MIB,
        writes=((0, 4 * KIB, 0x11),),
        virtual_size=1_000_448,
    ),
    _one_tib("vdi-1t", "vdi", "1 TiB dynamic VDI (its block map alone is 4 MiB)", granule=MIB),
    Spec("qed-default", "qed", "QED, qemu defaults (64 KiB clusters, 4-cluster tables)", granule=64 * KIB, quick=True),
    Spec(
        "qed-c4k-t16",
        "qed",
        "QED with 4 KiB clusters and 16-cluster tables",
        options="cluster_size=4096,table_size=16",
        granule=4 * KIB,
    ),
    _one_tib("qed-1t", "qed", "1 TiB QED with data at both ends", granule=64 * KIB),
    Spec("parallels-empty", "parallels", "Parallels (ploop) image, no data", granule=MIB, writes=(), quick=True),
    Spec("parallels-data", "parallels", "Parallels image with data (1 MiB clusters)", granule=MIB),
)


def _allocated(spec: Spec, writes: tuple[Write, ...], size: int) -> int | None:
    if spec.fmt in NO_BLOCK_STATUS:
        return None
    return tools.covered(writes, spec.granule, size) if spec.granule else size


def _build(spec: Spec, ctx: Context) -> Sample:
    rel = f"{spec.fmt}/{spec.name}.{EXTENSIONS[spec.fmt]}"
    path = ctx.out(rel)
    writes = _spread(spec.size) if spec.writes is None else spec.writes
    tools.create(path, spec.fmt, spec.size, spec.options)
    tools.write(path, spec.fmt, writes)
    if spec.fmt in PINNERS:
        PINNERS[spec.fmt](path)
    if spec.fmt in {"parallels", "vhdx"}:
        tools.dig_holes(path)  # whole 1 MiB clusters, the zeroed VHDX log: mostly zeros
    size = spec.size if spec.virtual_size is None else spec.virtual_size
    return Sample(
        name=spec.name,
        file=rel,
        format=spec.fmt,
        disk_format=GLANCE[spec.fmt],
        virtual_size=size,
        allocated=_allocated(spec, writes, size),
        description=spec.description,
    )


def _recipe(spec: Spec) -> Recipe:
    return Recipe(spec.name, lambda ctx: _build(spec, ctx), spec.quick)


RECIPES += [_recipe(spec) for spec in SPECS]
