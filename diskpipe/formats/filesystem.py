"""Bare filesystems (Amazon `ami` when partitionless): docs/formats.md §10.3."""

from __future__ import annotations

from diskpipe.formats.info import Content
from diskpipe.formats.partitions import looks_like_boot_sector

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from typing import Any

EXT_MAGIC_OFFSET = 1080
EXT_SUPERBLOCK = 1024
EXT_COMPAT_HAS_JOURNAL = 0x4
EXT_INCOMPAT_EXT4 = 0x40 | 0x80 | 0x200  # extents, 64bit, flex_bg
EXT_INCOMPAT_64BIT = 0x80


def _ext(head: bytes) -> Content | None:
    if len(head) < EXT_SUPERBLOCK + 340 or head[EXT_MAGIC_OFFSET : EXT_MAGIC_OFFSET + 2] != b"\x53\xef":
        return None
    superblock = head[EXT_SUPERBLOCK:]
    blocks = int.from_bytes(superblock[4:8], "little")
    log_block = int.from_bytes(superblock[24:28], "little")
    compat = int.from_bytes(superblock[92:96], "little")
    incompat = int.from_bytes(superblock[96:100], "little")
    if incompat & EXT_INCOMPAT_64BIT:
        blocks |= int.from_bytes(superblock[336:340], "little") << 32
    if log_block > 16:
        return None  # block sizes above 64 MiB do not exist; this is not a superblock
    name = "ext4" if incompat & EXT_INCOMPAT_EXT4 else "ext3" if compat & EXT_COMPAT_HAS_JOURNAL else "ext2"
    block_size = 1024 << log_block
    details: dict[str, Any] = {"block-size": block_size, "filesystem-bytes": blocks * block_size}
    label = superblock[120:136].split(b"\0", 1)[0]
    if label:
        details["label"] = label.decode("utf-8", "replace")
    return Content("filesystem", name, details)


def sniff(head: bytes) -> Content | None:
    found = _ext(head)
    if found is not None:
        return found
    if head[:4] == b"XFSB" and len(head) >= 16:
        block_size = int.from_bytes(head[4:8], "big")
        blocks = int.from_bytes(head[8:16], "big")
        return Content("filesystem", "xfs", {"block-size": block_size, "filesystem-bytes": block_size * blocks})
    if head[0x10040:0x10048] == b"_BHRfS_M":
        return Content("filesystem", "btrfs", {})
    if head[:4] == b"hsqs":
        return Content("filesystem", "squashfs", {})
    if head[512:520] == b"LABELONE":
        return Content("filesystem", "lvm2-pv", {})
    for page_size in (4096, 8192, 16384, 65536):
        if head[page_size - 10 : page_size] in (b"SWAPSPACE2", b"SWAP-SPACE"):
            return Content("filesystem", "swap", {"page-size": page_size})
    if len(head) >= 512 and head[510:512] == b"\x55\xaa":
        boot_sector = looks_like_boot_sector(head[:512])
        if boot_sector is not None:
            return Content("filesystem", boot_sector, {})
    return None
