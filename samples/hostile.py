"""Hostile samples: one image per case the safety policy must refuse, each
with the verdict and the exact check names it must get under the default
policy.

They are made with qemu-img where qemu can make them (backing files, data
files) and otherwise by patching honest images byte by byte (docs/formats.md
has the offsets). Every one is judged the same way from a file and from a
stream: table problems are placed where a stream sees them too.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from samples import tools
from samples.data import patch, read_at, seeded, sparse_file
from samples.manifest import Sample
from samples.recipe import Context, RecipeList

RECIPES = RecipeList()
KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
# qcow2 header fields the cases below change: (offset, struct layout).
VERSION = (4, ">I")
CLUSTER_BITS = (20, ">I")
L1_TABLE_OFFSET = (40, ">Q")
INCOMPATIBLE_FEATURES = (72, ">Q")


def _sample(
    path: str,
    fmt: str,
    virtual_size: int,
    checks: list[str],
    description: str,
    *,
    disk_format: str | None = None,
    contents: list[str] | None = None,
    verdict: str = "unsafe",
    claimed: str | None = None,
    qemu_oracle: bool = False,
) -> Sample:
    """The record of the sample at `path` (hostile/NAME.EXT...), named hostile-NAME;
    Glance's disk_format is qemu's format name unless given."""
    return Sample(
        name="hostile-" + Path(path).name.partition(".")[0],
        file=path,
        format=fmt,
        disk_format=disk_format or fmt,
        virtual_size=virtual_size,
        description=description,
        group="hostile",
        contents=contents or [],
        qemu_oracle=qemu_oracle,
        allocated=None,
        verdict=verdict,
        checks=sorted(checks),
        claimed=claimed,
    )


def _qcow2(ctx: Context, name: str, size: int = 16 * MIB, options: str = "", *extra: str) -> Path:
    path = ctx.out(f"hostile/{name}.qcow2")
    tools.create(path, "qcow2", size, options, *extra)
    return path


Change = Callable[[Path], None]


def _qemu_made(
    name: str,
    fmt: str,
    size: int,
    checks: list[str],
    description: str,
    *,
    options: str = "",
    extra: tuple[str, ...] = (),
    quick: bool = False,
    **sample: Any,
) -> Callable[[Change], Change]:
    """Registers hostile-NAME (NAME up to its first dot): an image of `size` made by
    `qemu-img create`, which the decorated function then changes in place."""

    def register(change: Change) -> Change:
        def build(ctx: Context) -> Sample:
            path = ctx.out(f"hostile/{name}")
            tools.create(path, fmt, size, options, *extra)
            change(path)
            return _sample(f"hostile/{name}", fmt, size, checks, description, **sample)

        RECIPES.add(f"hostile-{name.partition('.')[0]}", quick=quick)(build)
        return change

    return register


def _backing_passwd_case(name: str, fmt: str, description: str) -> None:
    """Registers hostile-NAME: a 16 MiB image made by qemu-img with /etc/passwd as its (raw) backing file."""
    backing = ("-u", "-b", "/etc/passwd", "-F", "raw")
    as_made = _qemu_made(
        name, fmt, 16 * MIB, ["backing_file"], description, extra=backing, quick=True, qemu_oracle=True
    )
    as_made(lambda _path: None)  # qemu-img wrote the hostile part


def _edit_field(path: Path, offset: int, layout: str, change: Callable[[int], int]) -> None:
    """Rewrite one header field in place; `change` maps its old value to the new one."""
    old = struct.unpack(layout, read_at(path, offset, struct.calcsize(layout)))[0]
    patch(path, offset, struct.pack(layout, change(old)))


def _qcow2_field_case(
    name: str, field: tuple[int, str], change: Callable[[int], int], checks: list[str], description: str
) -> None:
    """Registers hostile-NAME: a 16 MiB qemu-made qcow2 with one header field (offset, struct layout) changed."""
    _qemu_made(f"{name}.qcow2", "qcow2", 16 * MIB, checks, description)(lambda path: _edit_field(path, *field, change))


# -- qcow2 -------------------------------------------------------------------


_backing_passwd_case(
    "qcow2-backing-passwd.qcow2", "qcow2", "qcow2 whose backing file is /etc/passwd: qemu would read a host file"
)


@RECIPES.add("hostile-qcow2-backing-no-format")
def qcow2_backing_no_format(ctx: Context) -> Sample:
    path = _qcow2(ctx, "qcow2-backing-no-format")
    # Point the header at a name stored in the first cluster, no format extension.
    name = b"/etc/shadow"
    patch(path, 8, struct.pack(">QI", 1024, len(name)))
    patch(path, 1024, name)
    return _sample("hostile/qcow2-backing-no-format.qcow2", "qcow2", 16 * MIB, ["backing_file"],
                   "qcow2 naming /etc/shadow as backing file without a format (qemu would probe it)", qemu_oracle=True)  # fmt: skip


@RECIPES.add("hostile-qcow2-data-file", quick=True)
def qcow2_data_file(ctx: Context) -> Sample:
    path = ctx.out("hostile/qcow2-data-file.qcow2")
    data = ctx.tmp("data.raw")
    tools.create(path, "qcow2", 16 * MIB, f"data_file={data}")
    # Rename the data file to a host path: qemu would read /etc/hosts as the disk.
    image = bytearray(path.read_bytes())
    old = str(data).encode()
    position = image.find(old)
    new = b"/etc/hosts"
    image[position - 4 : position] = struct.pack(">I", len(new))
    image[position : position + len(old)] = new + bytes(len(old) - len(new))
    path.write_bytes(bytes(image))
    return _sample("hostile/qcow2-data-file.qcow2", "qcow2", 16 * MIB, ["data_file"],
                   "qcow2 keeping its data in the external file /etc/hosts (OSSA-2024-001)", qemu_oracle=True)  # fmt: skip


_qcow2_field_case("qcow2-data-file-bit", INCOMPATIBLE_FEATURES, lambda bits: bits | 4, ["data_file"],
                  "qcow2 with the external-data-file bit and no name (the data file is given at open time)")  # fmt: skip


_qcow2_field_case("qcow2-unknown-incompatible", INCOMPATIBLE_FEATURES, lambda bits: bits | (1 << 20),
                  ["unknown_features"], "qcow2 with an unknown incompatible feature bit (20)")  # fmt: skip


_qcow2_field_case("qcow2-version-4", VERSION, lambda _: 4, ["unsupported_version"],
                  "qcow2 claiming version 4 (does not exist)")  # fmt: skip


@RECIPES.add("hostile-qcow-v1")
def qcow_v1(ctx: Context) -> Sample:
    path = ctx.out("hostile/qcow-v1.qcow")
    tools.create(path, "qcow", 16 * MIB)
    return _sample("hostile/qcow-v1.qcow", "qcow", 16 * MIB, ["unsupported_version"],
                   "qcow version 1: obsolete, refused", qemu_oracle=True)  # fmt: skip


_qcow2_field_case("qcow2-cluster-bits", CLUSTER_BITS, lambda _: 30, ["header_sanity"],
                  "qcow2 with cluster_bits 30 (qemu allows 9..21)")  # fmt: skip


_qcow2_field_case("qcow2-l1-past-eof", L1_TABLE_OFFSET, lambda _: 1 << 30, ["table_past_eof"],
                  "qcow2 whose L1 table lies 1 GiB past the end of the file")  # fmt: skip


@RECIPES.add("hostile-qcow2-overlap")
def qcow2_overlap(ctx: Context) -> Sample:
    path = _qcow2(ctx, "qcow2-overlap")
    refcount_table = struct.unpack(">Q", read_at(path, 48, 8))[0]
    patch(path, 40, struct.pack(">Q", refcount_table))  # L1 table on top of the refcount table
    return _sample("hostile/qcow2-overlap.qcow2", "qcow2", 16 * MIB, ["table_overlap"],
                   "qcow2 whose L1 table overlaps its refcount table")  # fmt: skip


@RECIPES.add("hostile-qcow2-truncated")
def qcow2_truncated(ctx: Context) -> Sample:
    path = _qcow2(ctx, "qcow2-truncated")
    tools.write(path, "qcow2", [(0, 4 * MIB, 0x5A), (12 * MIB, 4 * MIB, 0xA5)])
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    return _sample("hostile/qcow2-truncated.qcow2", "qcow2", 16 * MIB, ["over_allocation", "table_past_eof"],
                   "qcow2 cut in half: its tables map clusters past the end, more data than the file holds")  # fmt: skip


@RECIPES.add("hostile-qcow2-size-bomb", quick=True)
def qcow2_size_bomb(ctx: Context) -> Sample:
    _qcow2(ctx, "qcow2-size-bomb", 64 * TIB)
    return _sample("hostile/qcow2-size-bomb.qcow2", "qcow2", 64 * TIB, ["virtual_size"],
                   "a few hundred KiB of qcow2 that expands to 64 TiB", qemu_oracle=True)  # fmt: skip


@RECIPES.add("hostile-qcow2-with-vhd-footer")
def qcow2_with_vhd_footer(ctx: Context) -> Sample:
    path = _qcow2(ctx, "qcow2-with-vhd-footer")
    footer = bytearray(512)
    size = path.stat().st_size
    footer[0:8] = b"conectix"
    struct.pack_into(">IIQI4sI4sQQHBBI", footer, 8, 2, 0x10000, 0xFFFFFFFFFFFFFFFF, 0, b"win ", 0x10000, b"Wi2k",
                     size, size, 1024, 16, 63, 2)  # fmt: skip
    struct.pack_into(">I", footer, 64, ~sum(footer) & 0xFFFFFFFF)
    with path.open("ab") as handle:
        handle.write(footer)
    return _sample("hostile/qcow2-with-vhd-footer.qcow2", "qcow2", 16 * MIB, ["multiple_formats"],
                   "a qcow2 that also ends in a fixed-VHD footer: two formats in one file")  # fmt: skip


@RECIPES.add("hostile-qcow2-over-iso", quick=True)
def qcow2_over_iso(ctx: Context) -> Sample:
    import io

    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3)
    payload = b"hello from inside the ISO\n"
    iso.add_fp(io.BytesIO(payload), len(payload), "/README.TXT;1")
    raw = io.BytesIO()
    iso.write_fp(raw)
    iso.close()
    image = bytearray(raw.getvalue())
    # A small qcow2 (512-byte clusters, all its tables in a few KiB) laid over
    # the ISO's 32 KiB system area: qemu's probe sees qcow2, a reader sees an ISO.
    header_path = ctx.tmp("header.qcow2")
    tools.create(header_path, "qcow2", MIB, "cluster_size=512")
    header = header_path.read_bytes()
    assert len(header) <= 32 * KIB
    image[: len(header)] = header
    path = ctx.out("hostile/qcow2-over-iso.iso")
    path.write_bytes(bytes(image))
    return _sample("hostile/qcow2-over-iso.iso", "qcow2", MIB, ["multiple_formats"],
                   "a qcow2 header hidden in an ISO's system area (one format inside another)", contents=["iso"])  # fmt: skip


@RECIPES.add("hostile-claimed-raw-but-qcow2", quick=True)
def claimed_raw(ctx: Context) -> Sample:
    _qcow2(ctx, "claimed-raw-but-qcow2")
    return _sample("hostile/claimed-raw-but-qcow2.qcow2", "qcow2", 16 * MIB, ["claimed_format"],
                   "an honest qcow2 uploaded as raw (Glance only warns)", claimed="raw", qemu_oracle=True)  # fmt: skip


@RECIPES.add("hostile-claimed-qcow2-but-vmdk")
def claimed_qcow2(ctx: Context) -> Sample:
    path = ctx.out("hostile/claimed-qcow2-but-vmdk.vmdk")
    tools.create(path, "vmdk", 16 * MIB)
    return _sample("hostile/claimed-qcow2-but-vmdk.vmdk", "vmdk", 16 * MIB, ["claimed_format"],
                   "an honest vmdk uploaded as qcow2", claimed="qcow2", qemu_oracle=True)  # fmt: skip


@RECIPES.add("hostile-claimed-iso-but-raw")
def claimed_iso(ctx: Context) -> Sample:
    path = ctx.out("hostile/claimed-iso-but-raw.raw")
    sparse_file(path, 4 * MIB)
    patch(path, 0, seeded(4096, 7))  # binary data, nothing recognisable
    return _sample("hostile/claimed-iso-but-raw.raw", "raw", 4 * MIB, ["claimed_format"],
                   "raw data without an ISO volume, claimed iso", claimed="iso", qemu_oracle=True)  # fmt: skip


# -- vmdk --------------------------------------------------------------------

DESCRIPTOR = """# Disk DescriptorFile
version=1
CID=12345678
parentCID=ffffffff
createType="{create_type}"

# Extent description
{extents}

# The Disk Data Base
#DDB

ddb.virtualHWVersion = "4"
ddb.adapterType = "ide"
"""


def _text_vmdk(ctx: Context, name: str, create_type: str, extents: str) -> Path:
    path = ctx.out(f"hostile/{name}.vmdk")
    path.write_text(DESCRIPTOR.format(create_type=create_type, extents=extents))
    return path


@RECIPES.add("hostile-vmdk-extent-host-path", quick=True)
def vmdk_host_path(ctx: Context) -> Sample:
    _text_vmdk(ctx, "vmdk-extent-host-path", "monolithicFlat", 'RW 8 FLAT "/etc/passwd" 0')
    return _sample("hostile/vmdk-extent-host-path.vmdk", "vmdk", 4096, ["vmdk_create_type", "vmdk_extents"],
                   "vmdk descriptor whose flat extent is /etc/passwd (CVE-2015-5162 family)")  # fmt: skip


@RECIPES.add("hostile-vmdk-extent-dotdot")
def vmdk_dotdot(ctx: Context) -> Sample:
    _text_vmdk(ctx, "vmdk-extent-dotdot", "monolithicFlat", 'RW 2048 FLAT "../../var/lib/secret.img" 0')
    return _sample("hostile/vmdk-extent-dotdot.vmdk", "vmdk", MIB, ["vmdk_create_type", "vmdk_extents"],
                   "vmdk descriptor with an extent outside its directory")  # fmt: skip


@RECIPES.add("hostile-vmdk-split")
def vmdk_split(ctx: Context) -> Sample:
    path = ctx.out("hostile/vmdk-split.vmdk")
    tools.create(path, "vmdk", 3 * GIB, "subformat=twoGbMaxExtentFlat")
    return _sample("hostile/vmdk-split.vmdk", "vmdk", 3 * GIB, ["vmdk_create_type", "vmdk_extents"],
                   "twoGbMaxExtentFlat: a descriptor and two flat extent files", qemu_oracle=True)  # fmt: skip


@RECIPES.add("hostile-vmdk-text-claims-sparse")
def vmdk_text_sparse(ctx: Context) -> Sample:
    _text_vmdk(ctx, "vmdk-text-claims-sparse", "monolithicSparse", 'RW 2048 SPARSE "disk.vmdk"')
    return _sample("hostile/vmdk-text-claims-sparse.vmdk", "vmdk", MIB, ["vmdk_descriptor", "vmdk_extents"],
                   "a text descriptor that claims a sparse createType (qemu refuses it)")  # fmt: skip


def _sparse_vmdk(ctx: Context, name: str, size: int = 16 * MIB) -> Path:
    path = ctx.out(f"hostile/{name}.vmdk")
    tools.create(path, "vmdk", size)
    return path


def _edit_embedded_descriptor(path: Path, edit: Callable[[str], str], padding: bytes = b"") -> None:
    region = read_at(path, 512, 20 * 512)
    text = region.split(b"\0", 1)[0].decode()
    new = edit(text).encode() + b"\0" + padding
    assert len(new) <= len(region)
    patch(path, 512, new + bytes(len(region) - len(new)))


def _sparse_vmdk_case(
    name: str, checks: list[str], description: str, *, quick: bool = False
) -> Callable[[Change], Change]:
    """A 16 MiB qemu-made monolithicSparse vmdk that the decorated function changes."""
    return _qemu_made(f"{name}.vmdk", "vmdk", 16 * MIB, checks, description, quick=quick, qemu_oracle=True)


@_sparse_vmdk_case("vmdk-bad-descriptor-line", ["vmdk_descriptor"],
                   "monolithicSparse whose descriptor has a line of free text", quick=True)  # fmt: skip
def vmdk_bad_line(path: Path) -> None:
    _edit_embedded_descriptor(path, lambda text: text + "this line is neither key=value nor an extent\n")


@_sparse_vmdk_case("vmdk-hidden-text", ["vmdk_descriptor"], "monolithicSparse hiding an extent line behind NUL padding")
def vmdk_hidden(path: Path) -> None:
    hidden = b'\nRW 8 FLAT "/etc/shadow" 0\n'
    _edit_embedded_descriptor(path, lambda text: text, padding=bytes(64) + hidden)


@_sparse_vmdk_case("vmdk-embedded-claims-flat", ["vmdk_descriptor"],
                   "sparse extent whose embedded descriptor claims monolithicFlat")  # fmt: skip
def vmdk_embedded_flat(path: Path) -> None:
    _edit_embedded_descriptor(
        path, lambda text: text.replace('createType="monolithicSparse"', 'createType="monolithicFlat"')
    )


@_sparse_vmdk_case("vmdk-oversized-descriptor", ["vmdk_descriptor"], "sparse extent declaring a 4 MiB descriptor")
def vmdk_oversized(path: Path) -> None:
    patch(path, 36, struct.pack("<Q", 8192))  # descriptor size: 4 MiB of sectors


@_sparse_vmdk_case("vmdk-parent-hint", ["backing_file"], "sparse vmdk naming /etc/passwd as its parent")
def vmdk_parent(path: Path) -> None:
    _edit_embedded_descriptor(
        path, lambda text: text.replace("parentCID=ffffffff", 'parentCID=ffffffff\nparentFileNameHint="/etc/passwd"')
    )


@_qemu_made("vmdk-bad-footer.vmdk", "vmdk", 16 * MIB, ["vmdk_footer"],
            "streamOptimized promising a footer that is not there", options="subformat=streamOptimized")  # fmt: skip
def vmdk_bad_footer(path: Path) -> None:
    patch(path, 56, struct.pack("<Q", 0xFFFFFFFFFFFFFFFF))  # GD at the end, but no footer there


@RECIPES.add("hostile-vmdk-footer-disagrees")
def vmdk_footer_disagrees(ctx: Context) -> Sample:
    path = ctx.out("hostile/vmdk-footer-disagrees.vmdk")
    tools.create(path, "vmdk", 16 * MIB, "subformat=streamOptimized")
    header = bytearray(read_at(path, 0, 512))
    size = path.stat().st_size
    footer_header = bytearray(header)
    struct.pack_into("<Q", footer_header, 12, (64 * MIB) // 512)  # the footer claims a bigger disk
    struct.pack_into("<Q", header, 56, 0xFFFFFFFFFFFFFFFF)
    patch(path, 0, bytes(header))
    footer_marker = struct.pack("<QII", 0, 0, 3) + bytes(496)
    end_marker = bytes(512)
    patch(path, size - 512, footer_marker + bytes(footer_header) + end_marker)
    return _sample("hostile/vmdk-footer-disagrees.vmdk", "vmdk", 64 * MIB, ["vmdk_footer"],
                   "streamOptimized whose footer header disagrees with its head (capacity)")  # fmt: skip


def _cowd(path: Path, descriptor: bytes) -> None:
    """An ESX 2 COWD extent of 1 MiB; qemu reads descriptor text at byte 512
    (for CID and parent hint) as for a KDMV extent, and needs a CID there."""
    header = struct.pack("<4sIIIIIII", b"COWD", 1, 3, 2048, 8, 4, 1, 2048)
    path.write_bytes(header + bytes(512 - len(header)) + descriptor + bytes(3584 - len(descriptor)))


@RECIPES.add("hostile-vmdk-cowd")
def vmdk_cowd(ctx: Context) -> Sample:
    _cowd(ctx.out("hostile/vmdk-cowd.vmdk"), b"CID=12345678\nparentCID=ffffffff\n")
    return _sample("hostile/vmdk-cowd.vmdk", "vmdk", MIB, ["vmdk_create_type"],
                   "an ESX 2 COWD sparse extent (vmfsSparse): not an accepted createType", qemu_oracle=True)  # fmt: skip


@RECIPES.add("hostile-vmdk-cowd-parent-hint", quick=True)
def vmdk_cowd_parent(ctx: Context) -> Sample:
    _cowd(ctx.out("hostile/vmdk-cowd-parent-hint.vmdk"),
          b'CID=12345678\nparentCID=ffffffff\nparentFileNameHint="/etc/passwd"\n')  # fmt: skip
    return _sample("hostile/vmdk-cowd-parent-hint.vmdk", "vmdk", MIB, ["backing_file", "vmdk_create_type"],
                   "COWD extent whose text at byte 512 names /etc/passwd as parent: qemu follows it", qemu_oracle=True)  # fmt: skip


@RECIPES.add("hostile-vmdk-capacity0-parent-hint")
def vmdk_capacity0_parent(ctx: Context) -> Sample:
    """Capacity 0: qemu opens the header's descriptor region (here at byte
    1536) as a descriptor file, but takes CID and parent hint from byte 512."""
    rel = "hostile/vmdk-capacity0-parent-hint.vmdk"
    path = _sparse_vmdk(ctx, "vmdk-capacity0-parent-hint", MIB)
    patch(path, 12, struct.pack("<Q", 0))
    patch(path, 28, struct.pack("<QQ", 3, 4))  # descriptor region: sectors 3-6
    qemu_text = b'CID=12345678\nparentCID=ffffffff\nparentFileNameHint="/etc/passwd"\n'
    # The one extent is the file itself, as flat data: qemu opens nothing else.
    region = (b'# Disk DescriptorFile\nversion=1\nCID=9abcdef0\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
              b'RW 2048 FLAT "vmdk-capacity0-parent-hint.vmdk" 0\n')  # fmt: skip
    patch(path, 512, qemu_text + bytes(1024 - len(qemu_text)) + region + bytes(2048 - len(region)))
    return _sample(rel, "vmdk", MIB, ["backing_file", "vmdk_create_type", "vmdk_descriptor"],
                   "capacity-0 sparse extent: descriptor region elsewhere, /etc/passwd as parent hint at byte 512",
                   qemu_oracle=True)  # fmt: skip


@RECIPES.add("hostile-vmdk-stream-gd-past-eof", quick=True)
def vmdk_stream_gd_past_eof(ctx: Context) -> Sample:
    """VMware layout (GD_AT_END in the head, the real header in a footer) with
    the footer's grain directory 512 MiB past the end: qemu reads zeros there."""
    path = ctx.out("hostile/vmdk-stream-gd-past-eof.vmdk")
    tools.create(path, "vmdk", 16 * MIB, "subformat=streamOptimized")
    size = path.stat().st_size
    header = bytearray(read_at(path, 0, 512))
    footer_header = bytearray(header)
    struct.pack_into("<Q", footer_header, 56, (512 * MIB) // 512)
    struct.pack_into("<Q", header, 56, 0xFFFFFFFFFFFFFFFF)
    patch(path, 0, bytes(header))
    footer_marker = struct.pack("<QII", 1, 0, 3).ljust(512, b"\0")
    patch(path, size - 512, footer_marker + bytes(footer_header) + bytes(512))
    return _sample("hostile/vmdk-stream-gd-past-eof.vmdk", "vmdk", 16 * MIB, ["table_past_eof"],
                   "streamOptimized whose footer puts the grain directory past the end of the file", qemu_oracle=True)  # fmt: skip


# -- other formats -------------------------------------------------------------


_backing_passwd_case("qed-backing.qed", "qed", "QED with /etc/passwd as backing file (QED itself is honest)")


@_qemu_made("qed-unknown-feature.qed", "qed", 16 * MIB, ["unknown_features"], "QED with an unknown feature bit")
def qed_unknown(path: Path) -> None:
    patch(path, 16, struct.pack("<Q", 1 << 10))


@RECIPES.add("hostile-vpc-differencing")
def vpc_differencing(ctx: Context) -> Sample:
    path = ctx.out("hostile/vpc-differencing.vhd")
    tools.create(path, "vpc", 16 * MIB)
    image = bytearray(path.read_bytes())
    # Both footer copies say differencing (type 4); the dynamic header gains a
    # parent locator pointing at a Windows path.
    for footer in (0, len(image) - 512):
        struct.pack_into(">I", image, footer + 60, 4)
        struct.pack_into(">I", image, footer + 64, 0)
        struct.pack_into(">I", image, footer + 64, ~sum(image[footer : footer + 512]) & 0xFFFFFFFF)
    struct.pack_into(">4sIIIQ", image, 512 + 576, b"W2ku", 512, 40, 0, 0)
    path.write_bytes(bytes(image))
    size = tools.info(path, "vpc")["virtual-size"]
    return _sample("hostile/vpc-differencing.vhd", "vpc", size, ["differencing_disk"],
                   "a differencing VHD naming a parent", disk_format="vhd", qemu_oracle=True)  # fmt: skip


@_qemu_made("vdi-parent.vdi", "vdi", 16 * MIB, ["differencing_disk"], "a VirtualBox differencing image (link UUID set)")
def vdi_parent(path: Path) -> None:
    patch(path, 0x1A8, bytes(range(1, 17)))  # uuid_link: a parent image


@_qemu_made("vdi-over-allocation.vdi", "vdi", 64 * MIB, ["over_allocation"],
            "VDI whose block map sends 64 blocks to one data block (claims more than the file holds)")  # fmt: skip
def vdi_over_allocation(path: Path) -> None:
    tools.write(path, "vdi", [(0, MIB, 0x77)])
    offset_bmap = struct.unpack("<I", read_at(path, 0x154, 4))[0]
    patch(path, offset_bmap, struct.pack("<I", 0) * 64)  # every block maps to data block 0


def _vhdx_patch_metadata_flags(path: Path, flags: int) -> None:
    """Set the file-parameters flags of a qemu-made VHDX (metadata at 3 MiB)."""
    metadata = 3 * MIB
    table = read_at(path, metadata, 64 * KIB)
    count = struct.unpack_from("<H", table, 10)[0]
    for index in range(count):
        entry = table[32 + index * 32 : 64 + index * 32]
        if entry[:4] == bytes.fromhex("3767a1ca"):
            item = struct.unpack_from("<I", entry, 16)[0]
            patch(path, metadata + item + 4, struct.pack("<I", flags))
            return
    raise RuntimeError("file parameters item not found")


@_qemu_made("vhdx-parent.vhdx", "vhdx", 16 * MIB, ["differencing_disk"], "a VHDX that declares a parent (differencing)")
def vhdx_parent(path: Path) -> None:
    _vhdx_patch_metadata_flags(path, 2)  # has_parent


@RECIPES.add("hostile-vhdx-region-limits")
def vhdx_region_limits(ctx: Context) -> Sample:
    from diskpipe.formats.crc import crc32c

    path = ctx.out("hostile/vhdx-region-limits.vhdx")
    tools.create(path, "vhdx", 16 * MIB)
    for table_offset in (192 * KIB, 256 * KIB):
        table = bytearray(read_at(path, table_offset, 64 * KIB))
        struct.pack_into("<I", table, 8, 4000)  # more entries than the 2047 allowed
        struct.pack_into("<I", table, 4, 0)
        struct.pack_into("<I", table, 4, crc32c(bytes(table)))
        patch(path, table_offset, bytes(table))
    return _sample("hostile/vhdx-region-limits.vhdx", "vhdx", 16 * MIB, ["vhdx_tables"],
                   "VHDX region table claiming 4000 entries (limit 2047), checksums intact")  # fmt: skip


# -- partitions and other contents -------------------------------------------------


def _crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


@RECIPES.add("hostile-gpt-extra-partitions", quick=True)
def gpt_extra_partitions(ctx: Context) -> Sample:
    path = ctx.out("hostile/gpt-extra-partitions.raw")
    sparse_file(path, 64 * MIB)
    tools.run(["sgdisk", "-n", "1:2048:+16M", "-t", "1:8300", str(path)])
    # A second MBR partition beside the protective one: a hybrid MBR that
    # shows another partition layout to BIOS tools than GPT shows.
    patch(path, 446 + 16, bytes([0x80, 0, 0x21, 0, 0x83, 0, 0, 0]) + struct.pack("<II", 2048, 32768))
    return _sample("hostile/gpt-extra-partitions.raw", "raw", 64 * MIB, ["protective_mbr"],
                   "GPT disk whose protective MBR carries an extra partition", contents=["gpt", "mbr"],
                   qemu_oracle=True)  # fmt: skip


@RECIPES.add("hostile-luks2")
def luks2(ctx: Context) -> Sample:
    tools.require("cryptsetup")
    path = ctx.out("hostile/luks2.img")
    sparse_file(path, 32 * MIB)
    key = ctx.tmp("key")
    key.write_bytes(b"hostile")
    tools.run(["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf", "pbkdf2",
               "--pbkdf-force-iterations", "1000", "--key-file", str(key), str(path)])  # fmt: skip
    tools.dig_holes(path)
    return _sample("hostile/luks2.img", "raw", 32 * MIB, ["luks_unsupported"],
                   "LUKS2: qemu 7.2 cannot open it; nothing inside can be inspected", contents=["luks"],
                   qemu_oracle=True)  # fmt: skip


@RECIPES.add("hostile-gzip-qcow2")
def gzip_qcow2(ctx: Context) -> Sample:
    import gzip

    source = ctx.tmp("inner.qcow2")
    tools.create(source, "qcow2", 16 * MIB)
    path = ctx.out("hostile/gzip-qcow2.qcow2.gz")
    with gzip.GzipFile(path, "wb", mtime=0) as out:
        out.write(source.read_bytes())
    size = -(-path.stat().st_size // 512) * 512
    return _sample("hostile/gzip-qcow2.qcow2.gz", "raw", size, ["not_a_disk_image"],
                   "a gzipped qcow2 uploaded as is (unpack it first)", contents=["compressed"])  # fmt: skip


@RECIPES.add("hostile-text-claimed-raw")
def text_claimed_raw(ctx: Context) -> Sample:
    path = ctx.out("hostile/text-claimed-raw.raw")
    path.write_text("#!/bin/sh\necho this is a shell script, not a disk\n" * 20)
    size = -(-path.stat().st_size // 512) * 512
    return _sample("hostile/text-claimed-raw.raw", "raw", size, ["not_a_disk_image"],
                   "a text file uploaded as a raw disk", contents=["text"], claimed="raw")  # fmt: skip
