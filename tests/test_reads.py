"""The read protocol: the same inspector answers alike from a file, from any
positioned reader and from a stream fed in chunks of any size; a stream never holds more than
its bound and says "unavailable" for bytes it has passed."""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from diskpipe.formats.errors import Unavailable
from diskpipe.formats.reads import (
    HEAD_RETAIN,
    MAX_READ,
    TAIL_RETAIN,
    GetSize,
    Read,
    ReadTail,
    Request,
    StreamDriver,
    run_on_file,
    run_on_reader,
)

DATA = bytes(range(256)) * (4 * 1024 * 1024 // 256 + 7)  # 4 MiB and a bit, non-repeating per 256


def forward_reader() -> Generator[Request, Any, list[Any]]:
    """Reads the way honest inspectors do: head, forward ranges, then the end."""
    answers: list[Any] = []
    answers.append((yield Read(0, 64)))
    answers.append((yield Read(HEAD_RETAIN - 10, 20)))  # straddles the end of the head
    answers.append((yield Read(300_000, 5000)))
    answers.append((yield Read(2 * 1024 * 1024, MAX_READ)))
    answers.append((yield Read(len(DATA) - 5, 100)))  # a short read at the end
    answers.append((yield Read(len(DATA) + 10, 10)))  # past the end: empty
    answers.append((yield GetSize()))
    answers.append((yield ReadTail(1536)))
    answers.append((yield Read(100, 10)))  # back into the head: still there
    return answers


def expected() -> list[Any]:
    return [
        DATA[0:64],
        DATA[HEAD_RETAIN - 10 : HEAD_RETAIN + 10],
        DATA[300_000:305_000],
        DATA[2 * 1024 * 1024 : 2 * 1024 * 1024 + MAX_READ],
        DATA[len(DATA) - 5 :],
        b"",
        len(DATA),
        DATA[-1536:],
        DATA[100:110],
    ]


def feed(driver: StreamDriver, data: bytes, chunk: int) -> Any:
    view = memoryview(data)
    for start in range(0, len(data), chunk):
        driver.feed(view[start : start + chunk])
    return driver.finish()


def read_data(offset: int, length: int) -> bytes:
    return DATA[offset : offset + length]


def test_a_reader_and_a_file_answer_the_same(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(DATA)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert run_on_file(forward_reader(), fd, len(DATA)) == expected()
    finally:
        os.close(fd)
    assert run_on_reader(forward_reader(), read_data, len(DATA)) == expected()


def test_reads_inside_the_head_cost_no_further_call_to_the_reader() -> None:
    """The head read first is kept: a header read again, and the tail of data
    the head holds whole, come from it (no second system call per file)."""
    small = DATA[:5000]
    calls: list[tuple[int, int]] = []

    def read_small(offset: int, length: int) -> bytes:
        calls.append((offset, length))
        return small[offset : offset + length]

    def reader() -> Generator[Request, Any, tuple[bytes, bytes, int, bytes, bytes]]:
        head = yield Read(0, HEAD_RETAIN)
        again = yield Read(100, 50)
        size = yield GetSize()
        tail = yield ReadTail(512)
        past = yield Read(4990, 100)  # a short read at the end, still inside
        return head, again, size, tail, past

    assert run_on_reader(reader(), read_small, len(small)) == (
        small,
        small[100:150],
        len(small),
        small[-512:],
        small[4990:],
    )
    assert calls == [(0, len(small))]


@pytest.mark.parametrize("chunk", [1 << 20, 65536, 4096, 17, 16 * 1024 * 1024])
def test_stream_answers_like_a_file_for_any_chunk_size(chunk: int) -> None:
    assert feed(StreamDriver(forward_reader()), DATA, chunk) == expected()


def test_stream_one_byte_chunks_on_a_small_input() -> None:
    small = DATA[:200_000]

    def reader() -> Generator[Request, Any, tuple[bytes, bytes, int]]:
        first = yield Read(0, 10)
        later = yield Read(150_000, 100)
        size = yield GetSize()
        return first, later, size

    assert feed(StreamDriver(reader()), small, 1) == (small[:10], small[150_000:150_100], len(small))


def test_bytes_already_passed_are_unavailable_and_the_inspector_may_carry_on() -> None:
    def reader() -> Generator[Request, Any, tuple[str, bytes]]:
        yield Read(3 * 1024 * 1024, 10)
        try:
            yield Read(HEAD_RETAIN + 100, 10)  # passed, not in the head
            outcome = "read"
        except Unavailable:
            outcome = "unavailable"
        head = yield Read(0, 4)
        return outcome, head

    assert feed(StreamDriver(reader()), DATA, 65536) == ("unavailable", DATA[:4])


def test_stream_memory_stays_bounded_with_huge_chunks() -> None:
    driver = StreamDriver(forward_reader())
    feed(driver, DATA, 16 * 1024 * 1024)
    assert len(driver._head) <= HEAD_RETAIN
    assert len(driver._tail) <= TAIL_RETAIN


def test_an_inspector_asking_for_an_unbounded_read_is_a_bug() -> None:
    def greedy() -> Generator[Request, Any, None]:
        yield Read(0, MAX_READ + 1)

    with pytest.raises(AssertionError):
        run_on_reader(greedy(), read_data, len(DATA))


def test_an_inspector_error_surfaces_at_the_feed_that_caused_it() -> None:
    def picky() -> Generator[Request, Any, None]:
        data = yield Read(0, 4)
        if data != b"GOOD":
            raise ValueError("bad magic")

    driver = StreamDriver(picky())
    with pytest.raises(ValueError, match="bad magic"):
        driver.feed(b"BAD!" + bytes(100))
    with pytest.raises(ValueError, match="bad magic"):
        driver.finish()


def test_a_reader_gets_the_whole_head_in_one_call_and_a_file_only_what_is_asked(tmp_path: Path) -> None:
    """A reader whose calls cost a round trip (RBD) answers the detector's
    short first read with the whole head, and reads inside it cost no call;
    a file is read exactly as asked (copying bytes costs, a system call little)."""

    def reader() -> Generator[Request, Any, tuple[bytes, bytes, bytes]]:
        first = yield Read(0, 4096)
        inside = yield Read(60_000, 100)
        head = yield Read(0, HEAD_RETAIN)
        return first, inside, head

    calls: list[tuple[int, int]] = []

    def read_counted(offset: int, length: int) -> bytes:
        calls.append((offset, length))
        return read_data(offset, length)

    answers = (DATA[:4096], DATA[60_000:60_100], DATA[:HEAD_RETAIN])
    assert run_on_reader(reader(), read_counted, len(DATA)) == answers
    assert calls == [(0, HEAD_RETAIN)]
    path = tmp_path / "data"
    path.write_bytes(DATA[: 2 * HEAD_RETAIN])
    fd = os.open(path, os.O_RDONLY)
    pread = os.pread
    calls.clear()

    def pread_counted(fd: int, length: int, offset: int) -> bytes:
        calls.append((offset, length))
        return pread(fd, length, offset)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os, "pread", pread_counted)
            assert run_on_file(reader(), fd, 2 * HEAD_RETAIN) == answers
    finally:
        os.close(fd)
    assert calls == [(0, 4096), (60_000, 100), (0, HEAD_RETAIN)]


def _inspect_cut_after_first_read(path: Path, cut: int) -> None:
    """Inspect the file at `path`, truncating it to `cut` bytes right after
    the first read; an answer or a FormatError are both fine."""
    from diskpipe.formats.base import InspectOptions
    from diskpipe.formats.detect import inspection
    from diskpipe.formats.errors import FormatError

    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
    pread = os.pread
    cuts: list[int] = []

    def cut_after_first(fd: int, length: int, offset: int) -> bytes:
        data = pread(fd, length, offset)
        if not cuts:
            os.ftruncate(fd, cut)
            cuts.append(cut)
        return data

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os, "pread", cut_after_first)
            try:
                info = run_on_file(inspection(InspectOptions()), fd, size)
            except FormatError:
                pass
            else:
                assert info.file_size == size
    finally:
        os.close(fd)
    assert cuts == [cut]


def test_a_file_truncated_between_the_first_read_and_the_rest(tmp_path: Path) -> None:
    """A hostile uploader may truncate the file while it is inspected: the
    reads after the first come back short, and the inspection still ends in
    an answer or a FormatError, never another exception."""
    from diskpipe.formats.detect import FIRST_READ

    image = bytearray(4 * HEAD_RETAIN)
    image[0x8001:0x8006] = b"CD001"  # an ISO signature past the first read: the whole head is read next
    path = tmp_path / "image"
    for header in (b"", b"QFI\xfb\0\0\0\x03", b"KDMV\x01\0\0\0"):  # raw, and containers that read on
        image[: len(header)] = header
        for cut in (0, 100, FIRST_READ, FIRST_READ + 10, 0x8003, HEAD_RETAIN):
            path.write_bytes(image)
            _inspect_cut_after_first_read(path, cut)
