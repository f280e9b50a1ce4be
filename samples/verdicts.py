"""What the default safety policy must say about the honest samples that it
refuses anyway: honest files of kinds a cloud should not store as they are.

Hostile samples carry their verdict in their own recipe; this table covers
the honest ones, so every manifest entry records the verdict and the exact
check names `diskpipe validate` must give it.
"""

from __future__ import annotations

from samples.manifest import Sample

UNSAFE_HONEST: dict[str, list[str]] = {
    # Obsolete format, still opened by qemu.
    "qcow-v1": ["unsupported_version"],
    # Descriptors that make qemu open other files.
    "vmdk-monolithic-flat": ["vmdk_create_type", "vmdk_extents"],
    "vmdk-2gb-sparse": ["vmdk_create_type", "vmdk_extents"],
    "vmdk-2gb-flat": ["vmdk_create_type", "vmdk_extents"],
    "vmdk-vmfs": ["vmdk_create_type", "vmdk_extents"],
    # qemu 7.2 cannot open LUKS2; nothing inside can be checked.
    "luks2-cryptsetup": ["luks_unsupported"],
    # Not disk images: unpack before uploading.
    "tar-archive": ["not_a_disk_image"],
    "ova": ["not_a_disk_image"],
    "zip-archive": ["not_a_disk_image"],
    "text": ["not_a_disk_image"],
    "gzip-qcow2": ["not_a_disk_image"],
    "xz-raw": ["not_a_disk_image"],
    # Nothing boots from a disk of 0 bytes (Glance would serve it anyway).
    "raw-0b": ["empty_image"],
    "qcow2-size-0": ["empty_image"],
    # Rarely used qemu drivers, refused by the policy's allow-list.
    "bochs-growing": ["format_not_allowed"],
    "cloop-v2": ["format_not_allowed"],
    "dmg-udif": ["format_not_allowed"],
}


def apply(samples: list[Sample]) -> list[Sample]:
    """Set the expected verdict of honest samples the policy refuses."""
    for sample in samples:
        checks = UNSAFE_HONEST.get(sample.name)
        if sample.group == "honest" and checks is not None:
            sample.verdict = "unsafe"
            sample.checks = sorted(checks)
    return samples
