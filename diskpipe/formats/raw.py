"""Raw data: what qemu opens when no probe matches (docs/formats.md §0, §11)."""

from __future__ import annotations

import os

from diskpipe.formats.info import Facts
from diskpipe.formats.layout import round_up

NAME = "raw"


def facts(file_size: int) -> Facts:
    """qemu sizes raw data as the file size rounded up to a sector."""
    return Facts(format=NAME, virtual_size=round_up(file_size, 512))


def data_bytes(fd: int, start: int, end: int) -> int | None:
    """Bytes in [start, end) that the filesystem holds as data (not holes),
    found with SEEK_DATA/SEEK_HOLE; None where the filesystem cannot say."""
    total = 0
    position = start
    # SEEK_DATA/SEEK_HOLE move the file offset, which the caller may share
    # (a dup'd descriptor): put it back afterwards.
    saved = os.lseek(fd, 0, os.SEEK_CUR)
    try:
        while position < end:
            try:
                data_start = os.lseek(fd, position, os.SEEK_DATA)
            except OSError as error:
                if error.errno == 6:  # ENXIO: no data after position
                    break
                raise
            if data_start >= end:
                break
            hole_start = os.lseek(fd, data_start, os.SEEK_HOLE)
            total += min(hole_start, end) - data_start
            position = hole_start
    except OSError:
        return None
    finally:
        os.lseek(fd, saved, os.SEEK_SET)
    return total
