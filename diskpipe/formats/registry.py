"""Every container format and content sniffer, in the order they are tried.

The order of containers decides which of two matches is the primary one
(qemu picks the first driver with the highest probe score); both are reported.

A container's module is imported only when its signature is in the probe
buffer: each probe accepts only buffers that hold its format's signature, so
testing the signature here first gives the same matches while a
`diskpipe info` of a qcow2 never loads the VMDK, VHDX or Parallels code
(tests/test_fast_paths.py checks the signatures against the probes).
"""

from __future__ import annotations

from diskpipe.formats import filesystem, iso, kernel, luks, partitions
from diskpipe.formats.base import PROBE_SIZE, ContainerFormat

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from collections.abc import Callable

    from diskpipe.formats.base import ContentSniffer


def _at(offset: int, *signatures: bytes) -> Callable[[bytes], bool]:
    def holds(buffer: bytes) -> bool:
        return buffer[offset : offset + len(signatures[0])] in signatures

    return holds


def _vmdk_signature(buffer: bytes) -> bool:
    # A binary extent's magic, or the `version=` line every text descriptor
    # must have (qemu's text probe looks for it after comments and blank lines).
    return buffer[:4] in (b"KDMV", b"COWD") or b"version=" in buffer


# (module in diskpipe.formats, signature test), in qemu's probe order.
CONTAINER_SIGNATURES: tuple[tuple[str, Callable[[bytes], bool]], ...] = (
    ("qcow2", _at(0, b"QFI\xfb")),
    ("qcow", _at(0, b"QFI\xfb")),
    ("qed", _at(0, b"QED\0")),
    ("vdi", _at(0x40, b"\x7f\x10\xda\xbe")),
    ("vmdk", _vmdk_signature),
    ("vhdx", _at(0, b"vhdxfile")),
    ("vpc", _at(0, b"conectix")),
    ("luks", _at(0, b"LUKS\xba\xbe")),
    ("parallels", _at(0, b"WithoutFreeSpace", b"WithouFreSpacExt")),
    ("bochs", _at(0, b"Bochs Virtual HD Image")),
    ("cloop", _at(0, b"#!/bin/sh\n#V2.0 Format\n")),
)

_loaded: dict[str, ContainerFormat] = {}


def container(module: str) -> ContainerFormat:
    """The container format implemented by `diskpipe.formats.<module>`, imported on first use."""
    found = _loaded.get(module)
    if found is None:
        import importlib

        found = _loaded[module] = importlib.import_module(f"diskpipe.formats.{module}").FORMAT
    return found


def all_containers() -> tuple[ContainerFormat, ...]:
    """Every container format, in probe order (imports them all)."""
    return tuple(container(module) for module, _ in CONTAINER_SIGNATURES)


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


def probe_containers(data: bytes) -> list[ContainerFormat]:
    """Containers whose probe accepts the start of `data` (zero padded as qemu pads)."""
    buffer = data[:PROBE_SIZE]
    if len(buffer) < PROBE_SIZE:
        buffer = buffer + bytes(PROBE_SIZE - len(buffer))
    return [
        found
        for module, signature in CONTAINER_SIGNATURES
        if signature(buffer) and (found := container(module)).probe(buffer)
    ]
