"""Ramdisks (Amazon `ari`) and compressed streams inside raw data (docs/formats.md §10.2).

A cpio archive, or a compressed stream whose decompressed start is a cpio
archive, is a ramdisk. A compressed stream whose decompressed start is an
arm64 or RISC-V kernel `Image` is a kernel (Debian's arm64 `vmlinuz` is a
gzipped Image, and boot loaders take it as it is). Any other compressed
stream is compressed content, not a disk image; what its start decompresses
to is reported. Only a bounded prefix is ever decompressed (`PREFIX`), with
memory limits on the codecs.
"""

from __future__ import annotations

import zlib

from diskpipe.formats import kernel
from diskpipe.formats.info import Content

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

# Decompressed bytes looked at: what the tests on them read (a cpio magic,
# a kernel Image header, the containers' 2048-byte probe buffer), with room.
# "decodable" says these first bytes decode; more would cost every
# compressed upload a 64 KiB inflate (over 100 µs) for nothing read.
PREFIX = 4 * 1024
CPIO_MAGICS = (b"070701", b"070702", b"070707")
CPIO_BINARY = (b"\xc7\x71", b"\x71\xc7")
LZ4_LEGACY = b"\x02\x21\x4c\x18"
LZ4_FRAME = b"\x04\x22\x4d\x18"
XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
LZOP_MAGIC = b"\x89LZO\x00\r\n\x1a\n"
GZIP_MAGIC = b"\x1f\x8b"
BZIP2_MAGIC = b"BZh"
LZMA_ALONE_MAGIC = b"\x5d\x00\x00"
# The first two bytes of a cpio archive and of every stream `sniff` decodes:
# data that starts with none of them is neither, told by one set lookup
# instead of the dozen slices and comparisons of is_cpio and _algorithm
# (asked of nearly every raw upload; tests/test_fast_paths.py holds the two
# against each other).
_MAGIC_STARTS = frozenset(
    magic[:2]
    for magic in (*CPIO_MAGICS, *CPIO_BINARY, GZIP_MAGIC, XZ_MAGIC, ZSTD_MAGIC, LZ4_LEGACY, LZ4_FRAME, BZIP2_MAGIC,
                  LZMA_ALONE_MAGIC, LZOP_MAGIC)
)  # fmt: skip
CODEC_MEMORY_LIMIT = 128 * 1024 * 1024


def is_cpio(data: bytes) -> bool:
    return data[:6] in CPIO_MAGICS or data[:2] in CPIO_BINARY


def _gzip(data: bytes) -> bytes:
    return zlib.decompressobj(wbits=31).decompress(data, PREFIX)


def _bzip2(data: bytes) -> bytes:
    import bz2  # only for bzip2 content

    return bz2.BZ2Decompressor().decompress(data, max_length=PREFIX)


def _xz(data: bytes) -> bytes:
    import lzma  # only for xz/lzma content

    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=CODEC_MEMORY_LIMIT).decompress(data, max_length=PREFIX)


def _lzma_alone(data: bytes) -> bytes:
    import lzma  # only for lzma content

    return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE, memlimit=CODEC_MEMORY_LIMIT).decompress(
        data, max_length=PREFIX
    )


def _zstd(data: bytes) -> bytes:
    import io

    import zstandard  # only for zstd content

    decompressor = zstandard.ZstdDecompressor(max_window_size=CODEC_MEMORY_LIMIT)
    with decompressor.stream_reader(io.BytesIO(data), read_across_frames=True) as reader:
        out = bytearray()
        while len(out) < PREFIX:
            piece = reader.read(PREFIX - len(out))
            if not piece:
                break
            out += piece
        return bytes(out)


def _lz4_length(length: int, block: bytes, position: int) -> tuple[int, int]:
    """A token's 4-bit length; 15 continues in bytes that add up until one
    is not 255. Returns the length and the position after it."""
    if length == 15:
        while True:
            extra = block[position]
            position += 1
            length += extra
            if extra != 255:
                break
    return length, position


def _lz4_block(block: bytes, limit: int) -> bytes:
    """Decode one LZ4 block, stopping after `limit` output bytes."""
    out = bytearray()
    position = 0
    while position < len(block) and len(out) < limit:
        token = block[position]
        position += 1
        literal_length, position = _lz4_length(token >> 4, block, position)
        out += block[position : position + literal_length]
        position += literal_length
        if position >= len(block):
            break
        offset = block[position] | block[position + 1] << 8
        position += 2
        if offset == 0 or offset > len(out):
            raise ValueError("lz4: bad match offset")
        match_length, position = _lz4_length(token & 15, block, position)
        match_length += 4
        out += _lz4_match(out, offset, min(match_length, limit - len(out) + 1))
    return bytes(out[:limit])


def _lz4_match(out: bytearray, offset: int, length: int) -> bytes | bytearray:
    """The `length` bytes a match copies from `offset` bytes back. A match
    longer than its offset copies bytes it has just written: the last
    `offset` bytes repeated, built in slices rather than byte by byte."""
    start = len(out) - offset
    if length <= offset:
        return out[start : start + length]
    pattern = out[start:]
    return (pattern * -(-length // offset))[:length]


def _lz4_legacy(data: bytes) -> bytes:
    # Legacy (kernel initramfs) framing: magic, then u32 block size + block.
    size = int.from_bytes(data[4:8], "little")
    return _lz4_block(data[8 : 8 + size], PREFIX)


def _lz4_frame(data: bytes) -> bytes:
    flags = data[4]
    # Frame descriptor: FLG, BD, header checksum; then the optional content
    # size (FLG bit 3) and dictionary id (FLG bit 0).
    header_length = 3 + (8 if flags & 0x08 else 0) + (4 if flags & 0x01 else 0)
    position = 4 + header_length
    size_word = int.from_bytes(data[position : position + 4], "little")
    block = data[position + 4 : position + 4 + (size_word & 0x7FFFFFFF)]
    if size_word & 0x80000000:
        return block[:PREFIX]  # stored uncompressed
    return _lz4_block(block, PREFIX)


def may_hold_magic(head: bytes) -> bool:
    """Whether `head` may start with a cpio or compression magic (a screen:
    False only when it starts with none of them)."""
    return head[:2] in _MAGIC_STARTS


def _algorithm(head: bytes) -> tuple[str, Callable[[bytes], bytes]] | None:
    if head[:2] == GZIP_MAGIC:
        return "gzip", _gzip
    if head[:6] == XZ_MAGIC:
        return "xz", _xz
    if head[:4] == ZSTD_MAGIC:
        return "zstd", _zstd
    if head[:4] == LZ4_LEGACY:
        return "lz4", _lz4_legacy
    if head[:4] == LZ4_FRAME:
        return "lz4", _lz4_frame
    if head[:3] == BZIP2_MAGIC and head[3:4] in b"123456789" and head[4:10] == b"\x31\x41\x59\x26\x53\x59":
        return "bzip2", _bzip2
    if head[:3] == LZMA_ALONE_MAGIC:
        return "lzma", _lzma_alone
    if head[:9] == LZOP_MAGIC:
        return "lzop", lambda data: b""
    return None


def decompressed_prefix(head: bytes) -> tuple[str, bytes | None] | None:
    """(algorithm, start of the decompressed data or None if it fails)."""
    found = _algorithm(head)
    if found is None:
        return None
    name, decode = found
    try:
        return name, decode(head)
    except Exception:  # noqa: BLE001 - any codec failure means "not decodable"
        return name, None


def sniff(head: bytes, inner_probe: Callable[[bytes], list[str]]) -> Content | None:
    """A ramdisk or compressed content; `inner_probe` names container formats
    found at the start of decompressed data (a gzipped qcow2, say)."""
    if not may_hold_magic(head):
        return None
    if is_cpio(head):
        return Content("ramdisk", "cpio", {"compression": None})
    found = decompressed_prefix(head)
    if found is None:
        return None
    algorithm, prefix = found
    if prefix is None:
        # lzma-alone's weak magic appears in random data; call it only when it decodes.
        if algorithm == "lzma":
            return None
        return Content("compressed", algorithm, {"decodable": False})
    if not prefix and algorithm == "lzma":
        return None
    if is_cpio(prefix):
        return Content("ramdisk", f"cpio.{algorithm}", {"compression": algorithm})
    image = kernel.sniff_image(prefix)
    if image is not None:
        return Content("kernel", f"{image.name}.{algorithm}", {**image.details, "compression": algorithm})
    details: dict[str, Any] = {"decodable": True}
    inner = inner_probe(prefix)
    if inner:
        details["inner-formats"] = inner
    return Content("compressed", algorithm, details)
