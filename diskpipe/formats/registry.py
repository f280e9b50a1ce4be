"""Every container format and content sniffer, in the order they are tried.

The order of containers decides which of two matches is the primary one
(qemu picks the first driver with the highest probe score); both are reported.
"""

from __future__ import annotations

from diskpipe.formats import (
    bochs,
    cloop,
    filesystem,
    iso,
    kernel,
    luks,
    nondisk,
    parallels,
    partitions,
    qcow,
    qcow2,
    qed,
    vdi,
    vhdx,
    vmdk,
    vpc,
)
from diskpipe.formats.base import PROBE_SIZE, ContainerFormat

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from diskpipe.formats.base import ContentSniffer

CONTAINERS: tuple[ContainerFormat, ...] = (
    qcow2.FORMAT,
    qcow.FORMAT,
    qed.FORMAT,
    vdi.FORMAT,
    vmdk.FORMAT,
    vhdx.FORMAT,
    vpc.FORMAT,
    luks.FORMAT,
    parallels.FORMAT,
    bochs.FORMAT,
    cloop.FORMAT,
)

# Ramdisks and compressed streams are sniffed separately (they need the
# container probes to name what compressed data holds).
SNIFFERS: tuple[ContentSniffer, ...] = (
    luks.sniff_luks2,
    iso.sniff,
    kernel.sniff,
    partitions.sniff_gpt,
    partitions.sniff_mbr,
    filesystem.sniff,
)
NON_DISK: ContentSniffer = nondisk.sniff


def probe_containers(data: bytes) -> list[ContainerFormat]:
    """Containers whose probe accepts the start of `data` (zero padded as qemu pads)."""
    buffer = data[:PROBE_SIZE]
    if len(buffer) < PROBE_SIZE:
        buffer = buffer + bytes(PROBE_SIZE - len(buffer))
    return [container for container in CONTAINERS if container.probe(buffer)]
