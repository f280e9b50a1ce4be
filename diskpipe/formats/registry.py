"""Every container format and content sniffer, in the order they are tried.

The order of containers decides which of two matches is the primary one
(qemu picks the first driver with the highest probe score); both are reported.

A container's probe runs, and its module is imported, only when its
signature is in the probe buffer: each probe accepts only buffers that hold
its format's signature, so looking the signature up first gives the same
matches for a dictionary lookup, and a `diskpipe info` of a qcow2 never
loads the VMDK, VHDX or Parallels code (tests/test_fast_paths.py checks the
signatures against the probes).
"""

from __future__ import annotations

import operator

from diskpipe.formats import filesystem, iso, kernel, luks, partitions
from diskpipe.formats.base import PROBE_SIZE, ContainerFormat

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from diskpipe.formats.base import ContentSniffer


# The container modules in qemu's probe order (the first match is primary).
PROBE_ORDER = ("qcow2", "qcow", "qed", "vdi", "vmdk", "vhdx", "vpc", "luks", "parallels", "bochs", "cloop")
# Containers whose signature starts the buffer, by its first four bytes: a
# probe accepts no buffer without them (tests/test_fast_paths.py).
_BY_START = {
    b"QFI\xfb": ("qcow2", "qcow"),
    b"QED\0": ("qed",),
    b"KDMV": ("vmdk",),
    b"COWD": ("vmdk",),
    b"vhdx": ("vhdx",),  # vhdxfile
    b"cone": ("vpc",),  # conectix
    b"LUKS": ("luks",),
    b"With": ("parallels",),  # WithoutFreeSpace, WithouFreSpacExt
    b"Boch": ("bochs",),  # Bochs Virtual HD Image
    b"#!/b": ("cloop",),  # the shell script preamble
}
VDI_SIGNATURE = (0x40, b"\x7f\x10\xda\xbe")
# Every text descriptor has its `version=` line (qemu's text probe looks for
# it after comments and blank lines).
VMDK_TEXT_SIGNATURE = b"version="
# qemu's text probe reads from the first byte: only a comment ('#'), a line
# of spaces or the version line itself may start a descriptor. Any other
# first byte rules it out without searching 2 KiB for `version=`, which
# cost every image a fifth of its container probing.
VMDK_TEXT_FIRST_BYTES = (b"#", b" ", b"v")


def candidates(buffer: bytes) -> list[str]:
    """The container modules whose signature is in the probe buffer, in probe order."""
    found = list(_BY_START.get(buffer[:4], ()))
    offset, signature = VDI_SIGNATURE
    if buffer[offset : offset + len(signature)] == signature:
        found.append("vdi")
    # find, not `in`: bytes.__contains__ tries the needle as an int first and
    # raises and clears a TypeError on every call.
    if "vmdk" not in found and buffer[:1] in VMDK_TEXT_FIRST_BYTES and buffer.find(VMDK_TEXT_SIGNATURE) >= 0:
        found.append("vmdk")
    if len(found) > 1:
        found.sort(key=PROBE_ORDER.index)
    return found


_loaded: dict[str, ContainerFormat] = {}


def container(module: str) -> ContainerFormat:
    """The container format implemented by `diskpipe.formats.<module>`, imported on first use."""
    found = _loaded.get(module)
    if found is None:
        # __import__ with a fromlist returns the submodule itself; importlib
        # would load the importlib package and warnings (~0.5 ms a start).
        found = _loaded[module] = __import__(f"diskpipe.formats.{module}", fromlist=["FORMAT"]).FORMAT
    return found


def all_containers() -> tuple[ContainerFormat, ...]:
    """Every container format, in probe order (imports them all)."""
    return tuple(container(module) for module in PROBE_ORDER)


# Ramdisks and compressed streams are sniffed separately (they need the
# container probes to name what compressed data holds), as is non-disk
# content: both only when no container matched, so they load then.
SNIFFERS: tuple[ContentSniffer, ...] = (
    luks.sniff_luks2,
    iso.sniff,
    kernel.sniff,
    partitions.sniff_gpt,
    partitions.sniff_mbr,
    filesystem.sniff,
)


# Where the content sniffers' signatures lie: (start, end, signatures). Each
# sniffer returns None for a head without one of its own (checked against
# the sniffers in tests/test_fast_paths.py), so a head with none of them
# skips all six: most container images have such a head, and six calls cost
# several times these lookups.
CONTENT_SIGNATURES: tuple[tuple[int, int, frozenset[bytes]], ...] = (
    (0, 4, frozenset({b"LUKS", b"\x7fELF", b"XFSB", b"hsqs"})),  # luks2, ELF kernel, xfs, squashfs
    (0x24, 0x28, frozenset({b"\x18\x28\x6f\x01"})),  # arm zImage
    (56, 60, frozenset({b"ARM\x64", b"RSC\x05"})),  # arm64 and RISC-V Image
    (510, 512, frozenset({b"\x55\xaa"})),  # MBR, boot sectors
    (512, 520, frozenset({b"EFI PART", b"LABELONE"})),  # GPT (512-byte sectors), LVM2 PV
    (0x202, 0x206, frozenset({b"HdrS"})),  # x86 kernel setup header
    (1080, 1082, frozenset({b"\x53\xef"})),  # ext2/3/4
    (4096, 4104, frozenset({b"EFI PART"})),  # GPT (4 KiB sectors)
    *((page - 10, page, frozenset({b"SWAPSPACE2", b"SWAP-SPACE"})) for page in (4096, 8192, 16384, 65536)),
    (32769, 32774, frozenset({b"CD001", b"BEA01", b"NSR02", b"NSR03", b"TEA01"})),  # ISO 9660, UDF
    (0x10040, 0x10048, frozenset({b"_BHRfS_M"})),  # btrfs
)


def signature_screen(entries: Sequence[tuple[int, int, frozenset[bytes]]]) -> Callable[[bytes], bool]:
    """A test of whether a head holds any of these signatures (at least two
    (start, end, signatures) entries). The places are cut from the head by
    one C call (an itemgetter of their slices) and looked up in their sets by
    map() and any(), in C too: a Python loop over them cost half as much
    again, on every image. A place past the end of the head cuts short and
    matches nothing, as no signature is shorter than its place."""
    if len(entries) < 2:
        raise ValueError("a signature screen needs two entries (an itemgetter of one returns no tuple)")
    cut = operator.itemgetter(*(slice(start, end) for start, end, _ in entries))
    expected = tuple(signatures for _, _, signatures in entries)
    contains = operator.contains

    def holds_a_signature(head: bytes) -> bool:
        return any(map(contains, expected, cut(head)))

    return holds_a_signature


# Whether any content sniffer's signature is in a head.
may_hold_content = signature_screen(CONTENT_SIGNATURES)


def signatures_beyond(length: int) -> tuple[tuple[int, int, tuple[tuple[int, int, frozenset[bytes]], ...]], ...]:
    """The content signatures that do not lie whole in the first `length`
    bytes, as windows to read: (window start, window length, the signatures
    with offsets into the window). Signatures less than a sector apart share
    a window (one read for both)."""
    beyond = sorted(entry for entry in CONTENT_SIGNATURES if entry[1] > length)
    windows: list[list[tuple[int, int, frozenset[bytes]]]] = []
    for entry in beyond:
        if windows and entry[0] - windows[-1][-1][1] < 512:
            windows[-1].append(entry)
        else:
            windows.append([entry])
    return tuple(
        (
            group[0][0],
            max(end for _, end, _ in group) - group[0][0],
            tuple((start - group[0][0], end - group[0][0], signatures) for start, end, signatures in group),
        )
        for group in windows
    )


def probe_containers(data: bytes) -> list[ContainerFormat]:
    """Containers whose probe accepts the start of `data` (zero padded as qemu pads)."""
    buffer = data[:PROBE_SIZE]
    if len(buffer) < PROBE_SIZE:
        buffer = buffer + bytes(PROBE_SIZE - len(buffer))
    return [found for module in candidates(buffer) if (found := container(module)).probe(buffer)]
