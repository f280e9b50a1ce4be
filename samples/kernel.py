"""Kernels (Amazon AKI) built by hand: an x86 bzImage, the same with an EFI
stub (MZ/PE header in front), an arm64 Image, and RISC-V Image; and the
Images compressed the way distributions ship them and boot loaders take them
(Debian's arm64 `vmlinuz` is a gzipped Image; U-Boot's booti also takes zstd).

Only the headers are real; the "compressed kernel" payload is seeded random
bytes (text for the compressed ones, so they stay small). That is all an
inspector may look at, and qemu calls them raw.
"""

from __future__ import annotations

import gzip
import struct

from samples.data import seeded, text_block, written_raw_sample
from samples.manifest import Sample
from samples.recipe import Context, RecipeList

RECIPES = RecipeList()

SETUP_SECTS = 27  # real-mode setup sectors after the boot sector (a typical 6.x value)
PAYLOAD = 292_185  # protected-mode bytes: the file is 306521 bytes, not a sector multiple
VERSION = b"6.1.0-diskpipe (sample@diskpipe) #1 SMP PREEMPT_DYNAMIC\0"
BOOT_MESSAGE = b"Use a boot loader.\r\n\nRemove disk and press any key to reboot...\r\n\0"


def bzimage(efi: bool) -> bytes:
    """Linux x86 boot protocol 2.15 header (Documentation/arch/x86/boot.rst)."""
    setup = bytearray((SETUP_SECTS + 1) * 512)
    if efi:
        # EFI stub: "MZ", e_lfanew at 0x3C pointing at a PE header in sector 0.
        setup[0:2] = b"MZ"
        struct.pack_into("<I", setup, 0x3C, 0x80)
        # PE signature, COFF header: machine x86-64, 1 section, optional header size 0xA0.
        setup[0x80:0x98] = b"PE\0\0" + struct.pack("<HHIIIHH", 0x8664, 1, 0, 0, 0, 0xA0, 0x0206)
    else:
        setup[0:5] = b"\xea\x05\x00\xc0\x07"  # ljmp $0x07c0,$5: what a real bootsector starts with
    setup[0x100 : 0x100 + len(BOOT_MESSAGE)] = BOOT_MESSAGE
    syssize = -(-PAYLOAD // 16)
    struct.pack_into("<BHIHHHH", setup, 0x1F1, SETUP_SECTS, 1, syssize, 0, 0xFFFF, 0, 0xAA55)
    struct.pack_into("<H4sH", setup, 0x200, 0x66EB, b"HdrS", 0x020F)  # jmp short 0x268; magic; protocol 2.15
    version_at = 0x400
    setup[version_at : version_at + len(VERSION)] = VERSION
    struct.pack_into("<IHHBBHI", setup, 0x208, 0, 0x1000, version_at - 0x200, 0, 0x01, 0x8000, 0x100000)
    # initrd_addr_max, kernel_alignment, relocatable, min_alignment, xloadflags, cmdline_size
    struct.pack_into("<IIBBHI", setup, 0x22C, 0x7FFFFFFF, 0x200000, 1, 21, 0x7F if efi else 0x03, 2047)
    struct.pack_into("<II", setup, 0x248, 0x3B0, PAYLOAD - 0x400)  # payload_offset / payload_length
    struct.pack_into("<QI", setup, 0x258, 0x1000000, 0x2000000)  # pref_address, init_size
    return bytes(setup) + seeded(PAYLOAD, seed=86)


def arm64_image() -> bytes:
    """arm64 Image header (Documentation/arch/arm64/booting.rst), 64 bytes."""
    size = 256 * 1024
    header = struct.pack(
        "<IIQQQQQQI I",
        0x14000010,  # code0: b +64 (branch over the header)
        0,
        0,  # text_offset
        size,  # image_size
        0xA,  # flags: little endian, 4K pages, anywhere in memory
        0,
        0,
        0,
        0x644D5241,  # "ARM\x64"
        0,
    )
    return header + seeded(size - len(header), seed=64)


def riscv_image() -> bytes:
    """RISC-V Image header (Documentation/arch/riscv/boot-image-header.rst), 64 bytes."""
    size = 256 * 1024
    header = struct.pack(
        "<IIQQQIIQ8s4sI",
        0x0100006F,  # code0: j +16 (jump over code1 and text_offset)
        0,
        0x200000,  # text_offset
        size,  # image_size
        0,  # flags: little endian
        2,  # header version 0.2
        0,
        0,
        b"RISCV\0\0\0",  # deprecated magic
        b"RSC\x05",
        0,
    )
    return header + seeded(size - len(header), seed=65)


def _compressible(image: bytes) -> bytes:
    """The header of `image` with compressible text after it (a small sample)."""
    return image[:64] + text_block(256 * 1024 - 64, "kernel")


def _sample(ctx: Context, name: str, data: bytes, description: str) -> Sample:
    return written_raw_sample(
        ctx, name, f"kernel/{name}", data, disk_format="aki", contents=["kernel"], description=description
    )


@RECIPES.add("aki-bzimage", quick=True)
def x86(ctx: Context) -> Sample:
    return _sample(
        ctx, "aki-bzimage", bzimage(efi=False), "x86 bzImage, boot protocol 2.15, 306521 bytes (virtual 306688)"
    )


@RECIPES.add("aki-bzimage-efi")
def x86_efi(ctx: Context) -> Sample:
    return _sample(ctx, "aki-bzimage-efi", bzimage(efi=True), "x86 bzImage with EFI stub: MZ/PE at 0 and HdrS at 0x202")


@RECIPES.add("aki-arm64-image")
def arm64(ctx: Context) -> Sample:
    return _sample(ctx, "aki-arm64-image", arm64_image(), "arm64 Image: ARM\\x64 magic at 56")


@RECIPES.add("aki-arm64-image-gz", quick=True)
def arm64_gzip(ctx: Context) -> Sample:
    data = gzip.compress(_compressible(arm64_image()), mtime=0)
    return _sample(
        ctx, "aki-arm64-image-gz", data, "gzipped arm64 Image (Debian's arm64 vmlinuz; qemu's arm loader gunzips it)"
    )


@RECIPES.add("aki-riscv-image")
def riscv(ctx: Context) -> Sample:
    return _sample(ctx, "aki-riscv-image", riscv_image(), "RISC-V Image: RSC\\x05 magic at 56")


@RECIPES.add("aki-riscv-image-zst")
def riscv_zstd(ctx: Context) -> Sample:
    import zstandard  # a diskpipe dependency already

    data = zstandard.ZstdCompressor(level=3).compress(_compressible(riscv_image()))
    return _sample(ctx, "aki-riscv-image-zst", data, "zstd-compressed RISC-V Image (as U-Boot's booti takes it)")
