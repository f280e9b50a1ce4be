"""Small inputs built to cost a lot: headers claiming huge tables, tables
whose entries point past the end or at each other, huge descriptors,
compression bombs, odd OVAs. Each is a few MB at most; what it may make
diskpipe spend is the question tests/test_memory.py asks.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import struct
import subprocess
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import zstandard

MiB = 1 << 20
OVF_HEAD = (
    b'<?xml version="1.0"?><Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" '
    b'xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">'
)


# -- qcow2 -------------------------------------------------------------------


def qcow2_header(cluster_bits: int, size: int, l1_size: int, l1_offset: int, **fields: int) -> bytearray:
    """A version 3 qcow2 header in a first cluster of zeros."""
    header = bytearray(1 << cluster_bits)
    struct.pack_into(
        ">4sIQIIQIIQQIIQ", header, 0, b"QFI\xfb", 3, 0, 0, cluster_bits, size, 0, l1_size, l1_offset,
        fields.get("refcount_table_offset", 0), fields.get("refcount_table_clusters", 0),
        fields.get("nb_snapshots", 0), fields.get("snapshots_offset", 0),
    )  # fmt: skip
    struct.pack_into(">QQQII", header, 72, fields.get("incompatible", 0), 0, 0, 4, 104)
    return header


def qcow2_l2_past_end() -> bytes:
    """1 MiB of L1 entries, each naming its own 2 MiB L2 table past the end."""
    bits, entries = 21, 128 * 1024
    cluster = 1 << bits
    header = qcow2_header(bits, entries * (cluster // 8) * cluster, entries, cluster)
    l1 = b"".join(struct.pack(">Q", (1 << 40) + index * cluster) for index in range(entries))
    return bytes(header) + l1


def qcow2_many_l2_tables() -> bytes:
    """512-byte clusters: 4096 L2 tables, every entry allocated, all in the file."""
    bits, tables = 9, 4096
    cluster = 1 << bits
    per_table = cluster // 8
    l1_offset = cluster
    l1_bytes = tables * 8
    first_l2 = l1_offset + -(-l1_bytes // cluster) * cluster
    header = qcow2_header(bits, tables * per_table * cluster, tables, l1_offset)
    l1 = b"".join(struct.pack(">Q", first_l2 + index * cluster) for index in range(tables))
    data_start = first_l2 + tables * cluster
    l2 = bytearray()
    for index in range(tables * per_table):
        l2 += struct.pack(">Q", (1 << 63) | (data_start + index * cluster))
    return bytes(header) + l1.ljust(first_l2 - l1_offset, b"\0") + bytes(l2)


def qcow2_bitmap_directory() -> bytes:
    """A bitmaps extension naming 2^32-1 bitmaps in a 1 MiB directory of zeros."""
    bits = 16
    cluster = 1 << bits
    header = qcow2_header(bits, 1 << 30, 16, cluster * 2, incompatible=0)
    extension = struct.pack(">II", 0x23852875, 24) + struct.pack(">IIQQ", 0xFFFFFFFF, 0, MiB, cluster * 4)
    header[104 : 104 + len(extension)] = extension
    return bytes(header) + bytes(cluster * 3) + bytes(MiB)


def qcow2_huge_claims() -> bytes:
    """Every table size field at its largest."""
    header = qcow2_header(
        16, (1 << 63) - 512, 0xFFFFFFFF, 1 << 16, refcount_table_offset=1 << 17,
        refcount_table_clusters=0xFFFFFFFF, nb_snapshots=0xFFFFFFFF, snapshots_offset=1 << 18,
    )  # fmt: skip
    return bytes(header) + b"\x01" * (2 * MiB)


def qcow1_overlapping_tables() -> bytes:
    """qcow version 1 (offsets need no alignment): 256 Ki L1 entries naming
    64 KiB L2 tables 8 bytes apart, all inside the file."""
    cluster_bits, l2_bits, entries = 9, 13, 256 * 1024
    l1_offset = 512
    header = bytearray(l1_offset)
    size = entries << (cluster_bits + l2_bits)
    struct.pack_into(">4sIQIIQBBxxIQ", header, 0, b"QFI\xfb", 1, 0, 0, 0, size, cluster_bits, l2_bits, 0, l1_offset)
    l1 = b"".join(struct.pack(">Q", l1_offset + index * 8) for index in range(entries))
    return bytes(header) + l1 + b"\x01" * (64 * 1024)


# -- other containers ----------------------------------------------------------


def vmdk_sparse(gd_entries: int, past_end: bool) -> bytes:
    """A hosted sparse extent whose grain directory points at `gd_entries`
    distinct grain tables: past the end, or overlapping inside the file."""
    gtes, grain = 512, 8
    capacity = gd_entries * gtes * grain
    header = bytearray(512)
    struct.pack_into("<4sIIQQQQIQQQB4sH", header, 0, b"KDMV", 1, 3, capacity, grain, 0, 0, gtes, 0, 1, 0, 0,
                     b"\n \r\n", 0)  # fmt: skip
    if past_end:
        directory = b"".join(struct.pack("<I", (1 << 31) + index * 4) for index in range(gd_entries))
    else:
        directory = b"".join(struct.pack("<I", 2 + index % 4096) for index in range(min(gd_entries, 4096)))
        directory = directory.ljust(gd_entries * 4, b"\0")
    return bytes(header) + directory + b"\x01" * MiB


def vmdk_text_descriptor() -> bytes:
    """A 1 MiB text descriptor of extent lines."""
    lines = [
        b"# Disk DescriptorFile",
        b"version=1",
        b"CID=fffffffe",
        b"parentCID=ffffffff",
        b'createType="monolithicFlat"',
    ]
    line = b'RW 1 FLAT "d" 0'
    size = sum(len(item) + 1 for item in lines)
    while size + len(line) + 1 < MiB - 1:
        lines.append(line)
        size += len(line) + 1
    return b"\n".join(lines) + b"\n"


def patched(base: bytes, *fields: tuple[int, str, int]) -> bytes:
    data = bytearray(base)
    for offset, fmt, value in fields:
        struct.pack_into(fmt, data, offset, value)
    return bytes(data)


def qemu_created(directory: Path, fmt: str, size: str, *options: str) -> bytes:
    path = directory / f"base.{fmt}"
    command = ["qemu-img", "create", "-q", "-f", fmt, *options, str(path), size]
    subprocess.run(command, check=True, capture_output=True)
    data = path.read_bytes()
    path.unlink()
    return data


def qed_l2_past_end() -> bytes:
    """qed with 1 MiB tables (64 KiB clusters x 16): the L1 table names
    128 Ki distinct aligned L2 tables past the end."""
    cluster, table_size = 64 * 1024, 16
    entries = cluster * table_size // 8
    header = bytearray(cluster)
    struct.pack_into("<4sIIIQQQQQII", header, 0, b"QED\x00", cluster, table_size, 1, 0, 0, 0, cluster,
                     entries * entries * cluster, 0, 0)  # fmt: skip
    l1 = b"".join(struct.pack("<Q", (1 << 40) + index * cluster) for index in range(entries))
    return bytes(header) + l1 + bytes(cluster)


# -- compressed data and OVAs ------------------------------------------------------


def zeros_chunks(total: int) -> Callable[[Callable[[bytes], object]], None]:
    """Feeds `total` bytes of zeros, 4 MiB at a time, to a writer."""

    def feed(write: Callable[[bytes], object]) -> None:
        block = bytes(4 * MiB)
        for _ in range(total // len(block)):
            write(block)

    return feed


def gzip_bomb(total: int) -> bytes:
    """Gzip members of 4 MiB of zeros, one after the other (one gzip stream to a reader)."""
    member = gzip.compress(bytes(4 * MiB), compresslevel=9, mtime=0)
    return member * (total // (4 * MiB))


def bzip2_bomb(total: int) -> bytes:
    """Concatenated bzip2 streams of 4 MiB of zeros each."""
    return bz2.compress(bytes(4 * MiB), 9) * (total // (4 * MiB))


def xz_of_zeros(total: int) -> bytes:
    """xz of zeros made with a small (1 MiB) dictionary."""
    compressor = lzma.LZMACompressor(filters=[{"id": lzma.FILTER_LZMA2, "preset": 0, "dict_size": MiB}])
    pieces: list[bytes] = []
    zeros_chunks(total)(lambda block: pieces.append(compressor.compress(block)))
    return b"".join(pieces) + compressor.flush()


def xz_claiming(packed: bytes, claimed_dict: int) -> bytes:
    """`packed` (one xz block) with its block header claiming a dictionary of
    `claimed_dict` bytes: a decoder allocates, and as the output grows
    fills, what the header says."""
    data = bytearray(packed)
    # Stream header: 12 bytes. Block header: size byte, flags, filter flags
    # (id 0x21, props size 1, dict byte), padding, CRC32.
    block = 12
    header_size = (data[block] + 1) * 4
    filter_at = data.index(b"\x21\x01", block + 2, block + header_size)
    data[filter_at + 2] = _lzma2_dict_byte(claimed_dict)
    crc = zlib.crc32(bytes(data[block : block + header_size - 4]))
    struct.pack_into("<I", data, block + header_size - 4, crc)
    return bytes(data)


def _lzma2_dict_byte(size: int) -> int:
    for value in range(41):
        if (2 | (value & 1)) << (value // 2 + 11) >= size:
            return value
    return 40


def zstd_with_window(total: int, window_log: int) -> bytes:
    """zstd of zeros whose frame header claims a `window_log` window."""
    compressor = zstandard.ZstdCompressor(level=1, write_content_size=False)
    out = io.BytesIO()
    with compressor.stream_writer(out, closefd=False) as writer:
        zeros_chunks(total)(writer.write)
    data = bytearray(out.getvalue())
    descriptor = data[4]
    assert not descriptor & 0x20, "single-segment frame: no window descriptor"
    data[5] = (window_log - 10) << 3
    return bytes(data)


def compressed(kind: str, data: bytes, *, xz_preset: int = lzma.PRESET_DEFAULT) -> bytes:
    """`data` as the gzip (no timestamp: the same bytes every run), xz,
    bzip2 or zstd (with its checksum, as the zstd tool writes) tool writes it."""
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    if kind == "xz":
        return lzma.compress(data, preset=xz_preset)
    if kind == "bzip2":
        return bz2.compress(data)
    if kind == "zstd":
        return zstandard.ZstdCompressor(write_checksum=True).compress(data)
    raise ValueError(f"no compressor {kind!r}")


def tar_of(members: list[tuple[str, bytes]], *, links: tuple[str, ...] = ()) -> bytes:
    """A ustar archive (an OVA is one) of `members`, then `links`: symlinks
    to /etc/passwd."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
        for name in links:
            link = tarfile.TarInfo(name)
            link.type = tarfile.SYMTYPE
            link.linkname = "/etc/passwd"
            archive.addfile(link)
    return out.getvalue()


def ovf_naming(disk: str) -> bytes:
    return (
        OVF_HEAD
        + (
            f'<References><File ovf:id="file1" ovf:href="{disk}"/></References>'
            '<DiskSection><Disk ovf:diskId="d1" ovf:fileRef="file1" ovf:capacity="1"/></DiskSection></Envelope>'
        ).encode()
    )


def _ustar_header(name: str, size: int) -> bytes:
    header = bytearray(512)
    header[0 : len(name)] = name.encode()
    header[100:108] = b"0000644\0"
    header[108:124] = b"0000000\0" * 2
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"00000000000\0"
    header[148:156] = b" " * 8
    header[156:157] = b"0"
    header[257:265] = b"ustar\x0000"
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def ova_many_members(count: int) -> bytes:
    """An OVA: its OVF, then `count` empty members, then the disk."""
    ovf = ovf_naming("disk.raw")
    parts = [_ustar_header("a.ovf", len(ovf)), ovf.ljust(-(-len(ovf) // 512) * 512, b"\0")]
    parts += [_ustar_header(f"m{index}", 0) for index in range(count)]
    parts += [_ustar_header("disk.raw", MiB), bytes(MiB), bytes(1024)]
    return b"".join(parts)


def ova_big_ovf() -> bytes:
    """An OVF just under 1 MiB of File elements (a dict entry each)."""
    element = b'<File ovf:id="f%d" ovf:href="x%d"/>'
    body = bytearray(OVF_HEAD + b"<References>")
    index = 0
    while len(body) < MiB - 4096:
        body += element % (index, index)
        index += 1
    body += b'</References><DiskSection><Disk ovf:fileRef="f0"/></DiskSection></Envelope>'
    return tar_of([("a.ovf", bytes(body)), ("x0", bytes(MiB))])


def ova_entities() -> bytes:
    """The billion laughs, as an OVF."""
    entities = ['<!ENTITY e0 "lol">'] + [f'<!ENTITY e{n} "{("&e" + str(n - 1) + ";") * 10}">' for n in range(1, 10)]
    ovf = (
        f'<?xml version="1.0"?><!DOCTYPE Envelope [{"".join(entities)}]>'
        '<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">'
        '<References><File ovf:id="file1" ovf:href="&e9;"/></References>'
        '<DiskSection><Disk ovf:fileRef="file1"/></DiskSection></Envelope>'
    ).encode()
    return tar_of([("a.ovf", ovf), ("disk.raw", bytes(MiB))])


def ova_deep_ovf() -> bytes:
    """An OVF of 100 000 nested elements."""
    depth = 100_000
    ovf = OVF_HEAD + b"<a>" * depth + b"</a>" * depth + b"</Envelope>"
    return tar_of([("a.ovf", ovf), ("disk.raw", bytes(MiB))])


def build(directory: Path) -> dict[str, bytes]:
    """Every adversarial input, by name."""
    vpc = qemu_created(directory, "vpc", "64M")
    vdi = qemu_created(directory, "vdi", "64M")
    parallels = qemu_created(directory, "parallels", "64M")
    xz_zeros = xz_of_zeros(320 * MiB)
    many_members = ova_many_members(50_000)
    inputs = {
        "qcow2-l2-tables-past-end": qcow2_l2_past_end(),
        "qcow2-4096-l2-tables": qcow2_many_l2_tables(),
        "qcow2-bitmap-directory": qcow2_bitmap_directory(),
        "qcow2-huge-claims": qcow2_huge_claims(),
        "qcow1-overlapping-l2-tables": qcow1_overlapping_tables(),
        "vmdk-grain-tables-past-end": vmdk_sparse(512 * 1024, past_end=True),
        "vmdk-grain-tables-overlapping": vmdk_sparse(512 * 1024, past_end=False),
        "vmdk-1mib-text-descriptor": vmdk_text_descriptor(),
        "qed-l2-tables-past-end": qed_l2_past_end(),
        # vpc: max_table_entries in the dynamic header (at 512 + 28).
        "vpc-bat-huge": patched(vpc, (512 + 28, ">I", 0xFFFFFFFF)) + b"\xff" * (2 * MiB),
        # vdi: blocks_in_image at 0x180, disk_size at 0x170.
        "vdi-block-map-huge": patched(vdi, (0x180, "<I", 0x3FFFFFFF), (0x170, "<Q", 0x3FFFFFFF << 20))
        + b"\x00" * (2 * MiB),
        # parallels: bat_entries at 32, nb_sectors at 36.
        "parallels-bat-huge": patched(parallels, (32, "<I", 0xFFFFFFFF), (36, "<Q", 0xFFFFFFFF << 11))
        + b"\x01" * (2 * MiB),
        "gzip-of-128mib-zeros": gzip_bomb(128 * MiB),
        "bzip2-of-128mib-zeros": bzip2_bomb(128 * MiB),
        # The output must be large for the dictionary or window to be filled.
        "xz-claiming-1gib-dictionary": xz_claiming(xz_zeros, 1 << 30),
        # The largest LZMA2 dictionary under a 256 MiB decoder memory limit.
        "xz-claiming-192mib-dictionary": xz_claiming(xz_zeros, 192 * MiB),
        "zstd-claiming-128mib-window": zstd_with_window(256 * MiB, 27),
        "gzip-in-gzip": gzip.compress(gzip_bomb(128 * MiB), mtime=0),
        "ova-50k-members": many_members,
        "ova-gz-50k-members": gzip.compress(many_members, compresslevel=6, mtime=0),
        "ova-1mib-ovf": ova_big_ovf(),
        "ova-billion-laughs": ova_entities(),
        "ova-deep-ovf": ova_deep_ovf(),
    }
    return inputs
