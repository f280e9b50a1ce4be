"""The public entry points: `inspect` for a path or file object, and
`StreamInspector` for data that arrives in chunks."""

from __future__ import annotations

import io
import os
import stat

from diskpipe.formats import raw
from diskpipe.formats.base import InspectOptions
from diskpipe.formats.detect import Progress, inspection, undecided_info
from diskpipe.formats.errors import FormatError, Unavailable
from diskpipe.formats.info import ImageInfo
from diskpipe.formats.reads import StreamDriver, run_on_file, run_on_reader

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import BinaryIO

    Source = str | os.PathLike[str] | BinaryIO

STREAM_CHUNK = 1024 * 1024
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
# The two option sets, made once: a NamedTuple built per call costs more than
# some of the sniffers it configures.
_OPTIONS = {False: InspectOptions(allocation=False), True: InspectOptions(allocation=True)}


def inspect(source: Source, *, allocation: bool = False, details: bool = False) -> ImageInfo:
    """Inspect an image at a path, or in a binary file object.

    A seekable regular file is read with positioned reads (its file position
    is left alone); anything else is read to its end as a stream. Raises
    `FormatError` for broken input and `OSError` for I/O problems.
    """
    options = _OPTIONS[bool(allocation)]
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        fd = os.open(path, _OPEN_FLAGS)
        try:
            info = _inspect_fd(fd, options, filename=path)
        finally:
            os.close(fd)
        return _with_details(info, path) if details else info
    source_fd = _regular_fileno(source)
    if source_fd is not None:
        name = getattr(source, "name", None)
        info = _inspect_fd(source_fd, options, filename=name if isinstance(name, str) else None)
        return _with_details(info, info.filename) if details and info.filename else info
    inspector = StreamInspector(allocation=allocation)
    while chunk := source.read(STREAM_CHUNK):
        inspector.feed(chunk)
    return inspector.finish()


def inspect_fd(fd: int, *, filename: str | None = None, allocation: bool = False) -> ImageInfo:
    """Inspect an open regular file or block device by its descriptor, with
    positioned reads; nothing is reopened, so a caller that goes on using
    the same descriptor uses the bytes inspected. `filename` only feeds the
    name-based guesses qemu also makes (a `.dmg` suffix)."""
    return _inspect_fd(fd, InspectOptions(allocation=allocation), filename=filename)


def _regular_fileno(source: BinaryIO) -> int | None:
    try:
        fd = source.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    return fd if stat.S_ISREG(os.fstat(fd).st_mode) else None


def _inspect_fd(fd: int, options: InspectOptions, filename: str | None) -> ImageInfo:
    status = os.fstat(fd)
    if stat.S_ISDIR(status.st_mode):
        raise IsADirectoryError(21, "is a directory", filename)
    size: int = status.st_size
    if stat.S_ISBLK(status.st_mode):
        size = os.lseek(fd, 0, os.SEEK_END)
    info = run_on_file(inspection(options, filename=filename, actual_size=status.st_blocks * 512), fd, size)
    if options.allocation and info.allocated_size is None and info.format == "raw":
        # Raw data has no allocation table: the filesystem's holes are its map
        # (as for `qemu-img map`). Fixed VHDs stay unset: qemu maps them as
        # all data, whatever the host holes.
        info = info.with_changes(allocated_size=raw.data_bytes(fd, 0, size))
    return info


def _with_details(info: ImageInfo, path: str | None) -> ImageInfo:
    """Deeper facts that cost more: pycdlib for ISOs, libmagic for unknown raw data."""
    from diskpipe.formats import iso_details, nondisk  # heavy, opt-in

    contents = list(info.contents)
    if path is not None and "iso" in info.content_kinds():
        contents = [iso_details.describe(path, content) if content.kind == "iso" else content for content in contents]
    if info.format == "raw" and not contents and path is not None:
        with open(path, "rb") as handle:
            opinion = nondisk.second_opinion(handle.read(65536))
        if opinion is not None:
            contents.append(opinion)
    return info.with_changes(contents=tuple(contents))


def inspect_reader(
    read_at: Callable[[int, int], bytes], size: int, *, allocation: bool = False, filename: str | None = None
) -> ImageInfo:
    """Inspect an image behind a positioned reader (e.g. an RBD image)."""
    return run_on_reader(inspection(InspectOptions(allocation=allocation), filename=filename), read_at, size)


class StreamInspector:
    """Inspects data fed in chunks of any size, with bounded memory.

    Memory held: at most `reads.HEAD_RETAIN + reads.TAIL_RETAIN +
    reads.MAX_READ` bytes (about 1.2 MiB) of image data, whatever the chunk
    size, plus the inspectors' own small state.

    `feed` and `finish` raise `FormatError` for broken input and nothing else
    for anything the data does. An honest image may keep a structure before
    one the stream has already read past (a VHDX whose log lies after its
    metadata): then the stream cannot decide, `undecided` says why, and
    `finish` returns the facts the head gave with `ImageInfo.undecided` set,
    which the policy turns into an undecided verdict (check the whole file).
    """

    def __init__(self, *, allocation: bool = False, filename: str | None = None) -> None:
        self.progress = Progress()
        # The file name is kept for the record only: a stream's answer must not
        # depend on it (qemu's dmg-by-name rule applies to files alone).
        self._filename = filename
        self._driver = StreamDriver(inspection(InspectOptions(allocation=allocation), None, self.progress))
        self._info: ImageInfo | None = None
        self.undecided: str | None = None

    @property
    def bytes_seen(self) -> int:
        return self._driver.position

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        try:
            self._driver.feed(chunk)
        except Exception as error:  # noqa: BLE001 - sorted by _settle
            self._settle(error)

    def finish(self) -> ImageInfo:
        if self._info is None:
            try:
                info: ImageInfo = self._driver.finish()
            except Exception as error:  # noqa: BLE001 - sorted by _settle
                self._settle(error)
                info = undecided_info(self.progress, self._driver.position, self.undecided or str(error))
            self._info = info.with_changes(streamed=True, filename=self._filename)
        return self._info

    def _settle(self, error: Exception) -> None:
        """Only `FormatError` leaves a stream inspection; returns when the
        stream could not decide."""
        if error is not self._driver.error or isinstance(error, FormatError):
            raise error  # a caller's mistake (feed after finish...), or broken input
        fmt = (self.progress.head_matches or ["stream"])[0]
        if isinstance(error, Unavailable):
            self.undecided = f"{fmt} structures come in an order a stream cannot follow ({error})"
            return
        # An inspector bug the data provoked (an IndexError, a bad request...):
        # refused as malformed rather than let an unexpected type escape.
        raise FormatError(fmt, f"inspection failed on this data: {type(error).__name__}: {error}") from error
