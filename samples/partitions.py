"""Partitioned whole-disk images: GPT (sgdisk), DOS/MBR (sfdisk), and a GPT
with 4096-byte logical sectors built by hand (sgdisk cannot be told the
sector size of a plain file).

They are raw to qemu. Glance would call a partitioned disk `raw`, so that is
the disk_format recorded (docs/formats.md §10.4 also counts whole disks as AMI
material, but an AMI upload is the partitionless filesystem).
"""

from __future__ import annotations

import struct
import uuid
import zlib
from pathlib import Path

from samples import tools
from samples.data import DISK_UUID, PART_UUIDS, patch, sectors, sparse_file
from samples.filesystems import mkfs_ext
from samples.manifest import Sample
from samples.recipe import Context, RecipeList

RECIPES = RecipeList()

MIB = 1 << 20
LINUX_FS = uuid.UUID("0FC63DAF-8483-4772-8E79-3D69D8477DE4")
EFI_SYSTEM = uuid.UUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")


def _sample(name: str, rel: str, path: Path, contents: list[str], description: str) -> Sample:
    return Sample(
        name=name,
        file=rel,
        format="raw",
        disk_format="raw",
        contents=contents,
        virtual_size=sectors(path.stat().st_size),
        allocated=None,  # tool-made raw file
        description=description,
    )


@RECIPES.add("gpt-2part", quick=True)
def gpt(ctx: Context) -> Sample:
    rel = "disk/gpt-2part.img"
    path = sparse_file(ctx.out(rel), 64 * MIB)
    tools.run(
        [
            "sgdisk",
            f"--disk-guid={DISK_UUID}",
            "--new=1:2048:+16M",
            "--typecode=1:8300",
            f"--partition-guid=1:{PART_UUIDS[0]}",
            "--change-name=1:root",
            "--new=2:0:0",
            "--typecode=2:ef00",
            f"--partition-guid=2:{PART_UUIDS[1]}",
            "--change-name=2:esp",
            str(path),
        ]
    )
    mkfs_ext(ctx, path, "ext4", offset=MIB, size=16 * MIB)  # a real filesystem in partition 1
    return _sample(
        "gpt-2part",
        rel,
        path,
        ["gpt", "mbr"],  # the protective MBR (one 0xEE entry) is an MBR too
        "64 MiB GPT disk by sgdisk: ext4 root partition + ESP, protective MBR",
    )


@RECIPES.add("mbr-2part", quick=True)
def mbr(ctx: Context) -> Sample:
    rel = "disk/mbr-2part.img"
    path = sparse_file(ctx.out(rel), 64 * MIB)
    script = b"label: dos\nlabel-id: 0x5a3c1e2b\n\nstart=2048, size=32768, type=83, bootable\nstart=34816, type=82\n"
    tools.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path)], stdin=script)
    mkfs_ext(ctx, path, "ext4", offset=MIB, size=16 * MIB)
    return _sample("mbr-2part", rel, path, ["mbr"], "64 MiB DOS-label disk by sfdisk: bootable Linux partition + swap")


def _gpt_header(
    disk_guid: uuid.UUID, current: int, backup: int, first: int, last: int, entries_lba: int, entries_crc: int
) -> bytes:
    header = bytearray(
        struct.pack(
            "<8sIIIIQQQQ16sQIII",
            b"EFI PART",
            0x00010000,
            92,
            0,  # CRC, filled below
            0,
            current,
            backup,
            first,
            last,
            disk_guid.bytes_le,
            entries_lba,
            128,
            128,
            entries_crc,
        )
    )
    struct.pack_into("<I", header, 16, zlib.crc32(header))
    return bytes(header)


@RECIPES.add("gpt-4kn")
def gpt_4kn(ctx: Context) -> Sample:
    """UEFI layout with 4096-byte LBAs: header at byte 4096, entries at 8192."""
    lba = 4096
    size = 32 * MIB
    total = size // lba
    entry_lbas = 128 * 128 // lba  # 4
    first, last = 2 + entry_lbas, total - 2 - entry_lbas
    entries = bytearray(128 * 128)
    for index, (type_guid, part_guid, start, end, name) in enumerate(
        ((LINUX_FS, PART_UUIDS[0], 256, 2815, "root"), (EFI_SYSTEM, PART_UUIDS[1], 2816, last, "esp"))
    ):
        struct.pack_into(
            "<16s16sQQQ72s",
            entries,
            index * 128,
            type_guid.bytes_le,
            uuid.UUID(part_guid).bytes_le,
            start,
            end,
            0,
            name.encode("utf-16-le"),
        )
    entries_crc = zlib.crc32(entries)
    disk_guid = uuid.UUID(DISK_UUID)
    protective = bytearray(512)
    protective[446:462] = struct.pack(
        "<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1, min(total - 1, 0xFFFFFFFF)
    )
    protective[510:512] = b"\x55\xaa"

    rel = "disk/gpt-4kn.img"
    path = sparse_file(ctx.out(rel), size)
    patch(path, 0, bytes(protective))
    patch(path, lba, _gpt_header(disk_guid, 1, total - 1, first, last, 2, entries_crc))
    patch(path, 2 * lba, bytes(entries))
    patch(path, (total - 1 - entry_lbas) * lba, bytes(entries))
    patch(
        path, (total - 1) * lba, _gpt_header(disk_guid, total - 1, 1, first, last, total - 1 - entry_lbas, entries_crc)
    )
    return _sample(
        "gpt-4kn",
        rel,
        path,
        ["gpt", "mbr"],
        "hand-made GPT for 4096-byte sectors (4Kn): EFI PART at 4096, not 512",
    )
