"""Local files as stores use them: nameless staging files, the hole map of
a sparse file, and reads and writes of a target held in a descriptor."""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator

from diskpipe.converter.checksums import Extent


def anonymous_file(directory: str, size: int = 0) -> int:
    """A nameless file in `directory` (O_TMPFILE; where the filesystem lacks
    it, a named file unlinked at once), sparse, `size` bytes long: whatever
    happens to the process, nothing is left under a name."""
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        path = os.path.join(directory, f".diskpipe-staged-{uuid.uuid4().hex}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.unlink(path)
    if size:
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
    return fd


def file_extents(fd: int, size: int) -> Iterator[Extent]:
    """(offset, length, holds data) from the filesystem's hole map."""
    position = 0
    while position < size:
        try:
            data_start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:
                break
            # No SEEK_DATA: report everything as data (still correct, just slower).
            yield position, size - position, True
            return
        if data_start >= size:
            break
        hole_start = min(os.lseek(fd, data_start, os.SEEK_HOLE), size)
        if data_start > position:
            yield position, data_start - position, False
        yield data_start, hole_start - data_start, True
        position = hole_start
    if position < size:
        yield position, size - position, False


class DescriptorTarget:
    """Reads and writes of a target whose bytes are a local file (the file
    store's image, the S3 store's staged raw file). A subclass says how it
    gets the descriptor."""

    size: int

    def _descriptor_for(self, writing: bool) -> int:
        raise NotImplementedError

    def extents(self) -> Iterator[Extent]:
        fd = self._descriptor_for(False)
        yield from file_extents(fd, min(self.size, os.fstat(fd).st_size))

    def read_at(self, offset: int, length: int) -> bytes:
        return os.pread(self._descriptor_for(False), length, offset)

    def stored_size(self) -> int:
        return os.fstat(self._descriptor_for(False)).st_size

    def write_at(self, offset: int, data: bytes) -> None:
        """Data written from Python rather than by qemu-img (the store tests)."""
        fd = self._descriptor_for(True)
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written
