"""Claims that need a header at offset 0, judged on the first bytes of a stream.

A qcow2, vmdk, vhdx, vdi, qed, luks, qcow or parallels claim can only fit
data whose start passes that format's probe. The probe looks at fixed bytes
(docs/formats.md §0), so the first byte that disagrees with every magic the
format allows already rules the claim out, long before the 128 KiB head the
full inspection waits for. An upload is then refused at once.
"""

from __future__ import annotations

from diskpipe.formats import luks, parallels, qcow, qcow2, qed, vdi, vhdx, vmdk
from diskpipe.formats.base import PROBE_SIZE
from diskpipe.formats.policy import CLAIM_ALIASES, Issue

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NamedTuple
else:
    from diskpipe.formats.tuples import NamedTuple


class HeaderClaim(NamedTuple):
    """What the start of the data must look like for a claim to fit."""

    name: str
    # The data begins with one of these (empty: no constraint on the start).
    starts: tuple[bytes, ...]
    # The format's own probe, and how many bytes it needs to be final.
    probe: Callable[[bytes], bool]
    decided_at: int


HEADER_CLAIMS = {
    "qcow2": HeaderClaim("qcow2", (qcow2.MAGIC,), qcow2.probe, 8),
    "qcow": HeaderClaim("qcow", (qcow.MAGIC + b"\0\0\0\x01",), qcow.probe, 8),
    "qed": HeaderClaim("qed", (qed.MAGIC,), qed.probe, 4),
    "vhdx": HeaderClaim("vhdx", (vhdx.SIGNATURE,), vhdx.probe, 8),
    "luks": HeaderClaim("luks", (luks.MAGIC + b"\0\x01",), luks.probe, 8),
    "parallels": HeaderClaim("parallels", (parallels.MAGIC_OLD, parallels.MAGIC_EXT), parallels.probe, 20),
    "vdi": HeaderClaim("vdi", (), vdi.probe, vdi.SIGNATURE_OFFSET + 4),
    # A binary extent, or a text descriptor: comment lines, lines of spaces,
    # or the version line first. The text rule is final after PROBE_SIZE bytes.
    "vmdk": HeaderClaim("vmdk", (vmdk.MAGIC_VMDK4, vmdk.MAGIC_VMDK3, b"#", b" ", b"version="), vmdk.probe, PROBE_SIZE),
}
PREFIX_NEEDED = max(claim.decided_at for claim in HEADER_CLAIMS.values())


def _agrees(prefix: bytes, start: bytes) -> bool:
    """The bytes that have arrived so far agree with `start`."""
    common = min(len(prefix), len(start))
    return prefix[:common] == start[:common]


def _rule(claimed: str | None) -> HeaderClaim | None:
    if claimed is None:
        return None
    return HEADER_CLAIMS.get(CLAIM_ALIASES.get(claimed.lower(), claimed.lower()))


def needs_header(claimed: str | None) -> bool:
    """The claim names a format whose header sits at offset 0."""
    return _rule(claimed) is not None


def ruled_out(claimed: str | None, prefix: bytes) -> Issue | None:
    """The `claimed_format` issue when the first bytes of the data already
    show that the claimed header is not there; None while it still may be."""
    rule = _rule(claimed)
    if rule is None or not prefix:
        return None
    prefix = prefix[:PROBE_SIZE]
    mismatch = bool(rule.starts) and not any(_agrees(prefix, start) for start in rule.starts)
    if not mismatch and len(prefix) >= rule.decided_at:
        mismatch = not rule.probe(prefix.ljust(PROBE_SIZE, b"\0"))
    if not mismatch:
        return None
    return Issue("claimed_format", f"claimed {claimed!r}, but the first bytes of the data are no {rule.name} header")
