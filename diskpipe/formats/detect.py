"""The detector: probes every format, inspects the matches, sniffs contents.

Order of reads matters for streams: the head first, then whatever the
matched containers ask for (forward reads), and the size and the tail last,
because a stream knows them only at its end.
"""

from __future__ import annotations

from diskpipe.formats import dmg, raw, registry, vpc
from diskpipe.formats.base import InspectOptions
from diskpipe.formats.errors import FormatError, Unavailable
from diskpipe.formats.info import GLANCE_DISK_FORMAT, Content, Facts, ImageInfo
from diskpipe.formats.reads import HEAD_RETAIN, GetSize, Read, ReadTail

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from collections.abc import Generator
    from typing import Any

    from diskpipe.formats.reads import Request

TAIL_NEEDED = 512  # a VHD footer, a dmg koly trailer
# Facts' fields from cluster_size to format_specific are ImageInfo's fields
# 6 to 14, in the same order: the detector copies them as one slice, which
# costs half as much as naming each (and this runs for every image).
_CARRIED_FACTS = ("cluster_size", "backing_file", "backing_file_format", "data_file", "encrypted", "dirty", "corrupt", "subformat", "format_specific")  # fmt: skip
if Facts._fields[2:11] != _CARRIED_FACTS or ImageInfo._fields[6:15] != _CARRIED_FACTS:
    raise ImportError("Facts and ImageInfo fields no longer line up (diskpipe.formats.detect copies them in order)")
# The first read. Every container's header, and most of what its inspector
# reads next, lies in the first few KiB, while copying the whole 128 KiB head
# out of the page cache cost a sixth of an inspection. The whole head is
# read (and sniffed, as before) only when a content sniffer may look at it:
# for data no container claims, and when a content signature is in it; the
# signatures beyond the first read are looked up first in a few small reads.
# A container's read past the first read is answered by its own request
# (`base.read_exact`), with the same bytes the head held.
FIRST_READ = 16 * 1024
# The detector's own requests, the same for every image: made once.
_FIRST_READ = Read(0, FIRST_READ)
_HEAD_READ = Read(0, HEAD_RETAIN)
_WINDOWS = tuple(
    (Read(start, length), signatures) for start, length, signatures in registry.signatures_beyond(FIRST_READ)
)
# The content signatures that lie whole in the first read: those past it
# are looked up in the windows, so a first read is screened for these alone.
_IN_FIRST_READ = registry.signature_screen([entry for entry in registry.CONTENT_SIGNATURES if entry[1] <= FIRST_READ])
_SIZE = GetSize()
_TAIL_READ = ReadTail(TAIL_NEEDED)


class Progress:
    """What the detector knows before the end of a stream (for early verdicts)."""

    def __init__(self) -> None:
        self.head_matches: list[str] | None = None
        self.contents: list[Content] | None = None


def sniff_contents(head: bytes, container_found: bool) -> list[Content]:
    """What lies inside the raw bytes. Archives and text are looked for only
    when no container matched (a VMDK descriptor is text, and honest)."""
    found = []
    if registry.may_hold_content(head):
        found = [content for sniff in registry.SNIFFERS if (content := sniff(head)) is not None]
    if not container_found:
        ramdisk, nondisk = _unclaimed_sniffers()
        compressed = ramdisk.sniff(head, _container_names)
        if compressed is not None:
            found.append(compressed)
        if not found:
            other = nondisk.sniff(head)
            if other is not None:
                found.append(other)
    return found


def _container_names(data: bytes) -> list[str]:
    return [fmt.name for fmt in registry.probe_containers(data)]


_loaded: list[Any] = []


def _unclaimed_sniffers() -> tuple[Any, Any]:
    """The ramdisk and non-disk modules, imported when data no container
    claims first comes (then kept: an import statement per call costs more
    than the sniffing)."""
    if not _loaded:
        from diskpipe.formats import nondisk, ramdisk

        _loaded.extend((ramdisk, nondisk))
    return _loaded[0], _loaded[1]


def glance_disk_format(format_name: str, contents: list[Content]) -> str:
    """Glance's disk_format for what was found."""
    if format_name != "raw":
        return GLANCE_DISK_FORMAT.get(format_name, format_name)
    kinds = {content.kind for content in contents}
    if "iso" in kinds:
        return "iso"
    if "kernel" in kinds:
        return "aki"
    if "ramdisk" in kinds:
        return "ari"
    if "filesystem" in kinds and not kinds & {"gpt", "mbr"}:
        return "ami"
    return "raw"


def undecided_info(progress: Progress, size: int, reason: str) -> ImageInfo:
    """What a stream that could not decide knows: the head's matches and
    contents, no container facts."""
    matches = progress.head_matches or []
    contents = progress.contents or []
    fmt = matches[0] if matches else "raw"
    return ImageInfo(
        format=fmt,
        disk_format=glance_disk_format(fmt, contents),
        virtual_size=0,
        file_size=size,
        matches=tuple(matches),
        contents=tuple(contents),
        undecided=reason,
    )


def _may_be_compressed(head: bytes) -> bool:
    """Whether the ramdisk sniffer may find anything: it decodes only data
    that starts with a cpio or compression magic."""
    ramdisk, _ = _unclaimed_sniffers()
    return ramdisk.may_hold_magic(head) and (ramdisk.is_cpio(head) or ramdisk._algorithm(head) is not None)


def _holds_signature(window: bytes, signatures: tuple[tuple[int, int, frozenset[bytes]], ...]) -> bool:
    for start, end, expected in signatures:  # noqa: SIM110 - any() over a generator costs more
        if window[start:end] in expected:
            return True
    return False


def _add_trailer_matches(
    tail: bytes, file_size: int, filename: str | None, names: list[str], facts: list[Facts]
) -> None:
    """Formats found at the end of the data: a fixed VHD's footer, a dmg's
    koly trailer (or, for want of any other match, a `.dmg` name)."""
    if "vpc" not in names and (footer := vpc.fixed_footer(tail)) is not None:
        facts.append(vpc.fixed_facts(tail, file_size, footer))
        names.append("vpc")
    if dmg.has_trailer(tail) or (not names and dmg.probe_name(filename)):
        facts.append(dmg.facts(tail))
        names.append("dmg")


def _primary_details(primary: Facts, facts: list[Facts], other_matches: dict[str, Any]) -> dict[str, Any]:
    """The primary format's details, with the other formats found beside it."""
    for extra in facts[1:]:
        other_matches.setdefault(extra.format, {"virtual-size": extra.virtual_size, "details": extra.details})
    details = dict(primary.details)
    if other_matches:
        details["other-matches"] = other_matches
    return details


def inspection(
    options: InspectOptions,
    filename: str | None = None,
    progress: Progress | None = None,
    actual_size: int | None = None,
) -> Generator[Request, Any, ImageInfo]:
    """Inspect the data behind the requests; `filename` and `actual_size`
    (the space a file takes on its filesystem) are facts of a file the
    caller knows, recorded as they are."""
    head: bytes = yield _FIRST_READ
    matched = registry.probe_containers(head)
    # Data without a content signature in its first read or in the windows
    # past it has no content for the sniffers to find in the whole head, nor
    # the whole head to read: a container image, and raw data that is not
    # compressed (a ramdisk or compressed stream is decoded from the whole
    # head; the other non-disk sniffers look at its first 4 KiB alone).
    # (A shorter first answer is all the data: the whole head is here.)
    whole = True
    if len(head) == FIRST_READ:
        if not _IN_FIRST_READ(head) and (matched or not _may_be_compressed(head)):
            whole = False
            for request, signatures in _WINDOWS:
                window: bytes = yield request
                if _holds_signature(window, signatures):
                    whole = True
                    break
        if whole:
            head = yield _HEAD_READ
    contents = [] if matched and not whole else sniff_contents(head, bool(matched))
    if progress is not None:
        progress.head_matches = [fmt.name for fmt in matched]
        progress.contents = contents

    facts: list[Facts] = []
    other_matches: dict[str, Any] = {}
    for index, container in enumerate(matched):
        if index == 0:
            facts.append((yield from container.inspect(head, options)))
            continue
        # A second format in the same bytes is a fact for the policy; its own
        # errors must not hide the first format's facts.
        try:
            facts.append((yield from container.inspect(head, options)))
        except (FormatError, Unavailable) as error:
            other_matches[container.name] = {"error": str(error)}

    file_size: int = yield _SIZE
    tail = b""
    if file_size:
        tail = yield _TAIL_READ
    names = [fmt.name for fmt in matched]
    _add_trailer_matches(tail, file_size, filename, names, facts)

    primary = facts[0] if facts else raw.facts(file_size)
    details = _primary_details(primary, facts, other_matches)
    # The primary container's facts carry over; those from cluster_size to
    # format_specific as one slice (see _CARRIED_FACTS).
    return ImageInfo(
        primary.format,
        glance_disk_format(primary.format, contents),
        primary.virtual_size,
        file_size,
        filename,
        actual_size,
        *primary[2:11],
        details,
        tuple(names),
        tuple(contents),
        primary.allocated_size,
    )
