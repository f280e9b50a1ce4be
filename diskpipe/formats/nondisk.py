"""Content that is not a disk image at all: archives (tar, OVA, zip...), text,
and whatever libmagic names (docs/formats.md §16).

The cheap checks here run on every inspection; python-magic is the second
opinion for raw data nothing else recognised, loaded only when asked for
(it costs ~46 ms at import, too much for the default `diskpipe info` path).
"""

from __future__ import annotations

from diskpipe.formats.info import Content

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from typing import Any

TEXT_SAMPLE = 4096
# Control characters text may hold, mapped to a printable one (a space).
_WHITESPACE_CONTROLS = {ord(char): " " for char in "\n\r\t\f\v"}
# The ASCII bytes str.isprintable() accepts, and those controls.
_PRINTABLE_ASCII = bytes(range(0x20, 0x7F)) + b"\n\r\t\f\v"
# A translate table that maps those bytes to 1 and every other byte to 0:
# one translate and one count tell the unprintable bytes, in C.
_PRINTABLE_CLASS = bytes(1 if byte in _PRINTABLE_ASCII else 0 for byte in range(256))
# How much of a sample is looked at before the whole of it (see _mostly_printable_ascii).
FIRST_LOOK = 512
ARCHIVE_MAGICS = (
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),
    (b"7z\xbc\xaf\x27\x1c", "7z"),
    (b"Rar!\x1a\x07", "rar"),
    (b"!<arch>\n", "ar"),
)
# libmagic MIME types that are certainly not disk images.
NON_DISK_MIME_PREFIXES = ("text/", "image/", "audio/", "video/", "font/")
NON_DISK_MIME_TYPES = frozenset({
    "application/zip", "application/x-tar", "application/gzip", "application/x-xz", "application/x-bzip2",
    "application/zstd", "application/x-7z-compressed", "application/x-rar", "application/pdf",
    "application/json", "application/xml", "application/x-executable", "application/x-sharedlib",
    "application/x-pie-executable", "application/vnd.microsoft.portable-executable", "application/java-archive",
    "application/x-dosexec", "application/msword", "application/x-sqlite3", "application/x-archive",
})  # fmt: skip


def _tar(head: bytes) -> Content | None:
    if len(head) < 512 or head[257:262] != b"ustar":
        return None
    first_member = head[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    if first_member.lower().endswith(".ovf"):
        return Content("archive", "ova", {"first-member": first_member})
    return Content("archive", "tar", {"first-member": first_member})


def _text(head: bytes) -> Content | None:
    sample = head[:TEXT_SAMPLE]
    if len(sample) < 1 or b"\0" in sample:
        return None
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError as error:
        # A multi-byte character cut at the sample's end is still text.
        if error.start < len(sample) - 3:
            return None
        text = sample[: error.start].decode("utf-8")
    # Counted in C where possible: ASCII's printable bytes are a fixed set,
    # and other text is most often printable throughout once its whitespace
    # controls read as spaces; only the rest is counted character by character.
    if text.isascii():
        if not _mostly_printable_ascii(text, sample):
            return None
    elif not text.translate(_WHITESPACE_CONTROLS).isprintable():
        printable = sum(1 for char in text if char.isprintable() or char in "\n\r\t\f\v")
        if printable < len(text) * 0.98:
            return None
    first_line = text.split("\n", 1)[0][:80]
    return Content("text", "text", {"first-line": first_line})


def _mostly_printable_ascii(text: str, sample: bytes) -> bool:
    """The 98 % rule for ASCII text, judged on its bytes: text printable
    throughout passes; otherwise the sample's unprintable bytes are counted
    against the text's length. Binary data (every raw image without a NUL
    byte in its first 4 KiB comes here) is settled by its first
    FIRST_LOOK bytes: their unprintable bytes alone already exceed the
    allowance, and the whole sample holds at least as many."""
    needed = len(text) * 0.98
    first = sample[: min(FIRST_LOOK, len(text))]
    if len(text) - first.translate(_PRINTABLE_CLASS).count(0) < needed:
        return False
    classes = sample.translate(_PRINTABLE_CLASS)
    if 0 not in classes[: len(text)]:
        return True
    return len(text) - classes.count(0) >= needed


def sniff(head: bytes) -> Content | None:
    found = _tar(head)
    if found is not None:
        return found
    for magic, name in ARCHIVE_MAGICS:
        if head.startswith(magic):
            return Content("archive", name, {})
    return _text(head)


_loaded: dict[str, Any] = {}  # python-magic, once loaded (or None)


def _magic() -> Any:
    if "magic" not in _loaded:
        try:
            import magic  # python-magic is loaded only for a second opinion

            _loaded["magic"] = magic
        except ImportError:
            _loaded["magic"] = None
    return _loaded["magic"]


def second_opinion(head: bytes) -> Content | None:
    """libmagic's name for the data, as a content when it is clearly not a disk."""
    module = _magic()
    if module is None:
        return None
    try:
        mime = module.from_buffer(head[:65536], mime=True)
        description = module.from_buffer(head[:65536])
    except Exception:  # noqa: BLE001 - libmagic failing is "no opinion"
        return None
    if mime in NON_DISK_MIME_TYPES or mime.startswith(NON_DISK_MIME_PREFIXES):
        return Content("other", mime, {"description": description})
    return None
