"""Kernels (Amazon `aki`) inside raw data: docs/formats.md §10.1; Linux
Documentation/arch/x86/boot.rst and the arm64 booting document."""

from __future__ import annotations

from diskpipe.formats.info import Content
from diskpipe.formats.layout import Layout

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from typing import Any

X86_SETUP = Layout("aki", "x86 setup header", "<", """
    0x1F1  B   setup_sects
    0x1F2  2x  root_flags
    0x1F4  I   syssize
    0x1F8  6x  ram_size_vid_mode_root_dev
    0x1FE  H   boot_flag
    0x200  2x  jump
    0x202  4s  header
    0x206  H   version
    0x208  6x  realmode_swtch_start_sys_seg
    0x20E  H   kernel_version
    0x210  1x  type_of_loader
    0x211  B   loadflags
""")  # fmt: skip
# The "Image" header shared by arm64 and RISC-V (Linux's
# Documentation/arch/riscv/boot-image-header.rst): image size at 16, magic at 56.
IMAGE_MAGICS = {b"ARM\x64": "arm64-image", b"RSC\x05": "riscv-image"}
IMAGE_HEADER = 64
ARM_ZIMAGE_MAGIC = 0x016F2818
LOADED_HIGH = 1


def sniff(head: bytes) -> Content | None:
    if len(head) >= X86_SETUP.size and head[0x202:0x206] == b"HdrS":
        setup = X86_SETUP.parse(head)
        if setup["boot_flag"] != 0xAA55:
            return None
        details: dict[str, Any] = {
            "protocol": f"{setup['version'] >> 8}.{setup['version'] & 0xFF:02d}",
            "setup-sectors": setup["setup_sects"] or 4,
            "efi-stub": head[:2] == b"MZ",
        }
        if setup["version"] >= 0x0204:
            details["declared-bytes"] = (details["setup-sectors"] + 1) * 512 + setup["syssize"] * 16
        if setup["kernel_version"]:
            start = setup["kernel_version"] + 0x200
            raw = head[start : start + 128]
            details["version"] = raw.split(b"\0", 1)[0].decode("latin-1")
        name = "bzImage" if setup["loadflags"] & LOADED_HIGH else "zImage"
        return Content("kernel", name, details)
    image = sniff_image(head)
    if image is not None:
        return image
    if len(head) >= 0x28 and int.from_bytes(head[0x24:0x28], "little") == ARM_ZIMAGE_MAGIC:
        return Content("kernel", "arm-zimage", {})
    if head[:4] == b"\x7fELF":
        return Content("kernel", "elf", {"class": {1: 32, 2: 64}.get(head[4], 0)})
    return None


def sniff_image(head: bytes) -> Content | None:
    """An arm64 or RISC-V `Image`: the kernels boot loaders also take
    compressed (qemu's arm loader gunzips one, U-Boot's booti and GRUB
    decompress them), so compressed data is asked about them too."""
    if len(head) < IMAGE_HEADER:
        return None
    name = IMAGE_MAGICS.get(bytes(head[56:60]))
    if name is None:
        return None
    return Content("kernel", name, {"image-size": int.from_bytes(head[16:24], "little")})
