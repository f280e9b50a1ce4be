"""What the command line draws: progress on a real pseudo-terminal (with
a width, and with none) and on a plain stream; sizes and user-controlled
text in tables."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import termios
from collections.abc import Iterator

import pytest

from diskpipe.cli.output import human_size, printable, record_rows
from diskpipe.progress import ProgressDisplay


@pytest.fixture
def terminal() -> Iterator[tuple[int, io.TextIOWrapper]]:
    """A pseudo-terminal: (master fd to read what was drawn, the slave as a stream)."""
    master, slave = pty.openpty()
    stream = os.fdopen(slave, "w")
    try:
        yield master, stream
    finally:
        stream.close()
        os.close(master)


def set_columns(stream: io.TextIOWrapper, columns: int) -> None:
    fcntl.ioctl(stream.fileno(), termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))


def drawn(master: int, stream: io.TextIOWrapper) -> str:
    stream.flush()
    os.set_blocking(master, False)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


def run_stages(display: ProgressDisplay) -> None:
    for stage in ("fetch", "convert"):
        for percent in (0.0, 40.0, 97.3):
            display.update(stage, percent)


@pytest.mark.parametrize("how", ["stty cols 0", "COLUMNS=0"])
def test_a_terminal_without_columns_gets_plain_lines(
    how: str, terminal: tuple[int, io.TextIOWrapper], monkeypatch: pytest.MonkeyPatch
) -> None:
    master, stream = terminal
    monkeypatch.delenv("COLUMNS", raising=False)
    if how == "COLUMNS=0":
        set_columns(stream, 80)
        monkeypatch.setenv("COLUMNS", "0")
    else:
        set_columns(stream, 0)
    display = ProgressDisplay(stream)
    assert not display.interactive
    run_stages(display)
    display.close(completed=True)
    lines = drawn(master, stream).replace("\r\n", "\n").splitlines()
    assert lines == ["fetch: 0.0%", "fetch: 100.0%", "convert: 0.0%", "convert: 100.0%"]


def test_a_bar_shows_an_ended_stage_at_100_percent(
    terminal: tuple[int, io.TextIOWrapper], monkeypatch: pytest.MonkeyPatch
) -> None:
    master, stream = terminal
    monkeypatch.delenv("COLUMNS", raising=False)
    set_columns(stream, 100)
    display = ProgressDisplay(stream)
    assert display.interactive
    run_stages(display)
    display.update("done", 100.0)  # the pipeline's last report ends the last stage
    display.close()
    output = drawn(master, stream)
    finals = [line.rsplit("\r", 1)[-1] for line in output.split("\r\n") if line.strip()]
    assert [final.split()[0] for final in finals] == ["fetch", "convert"]
    assert all("100.0%" in final for final in finals), finals
    assert "done" not in output


def test_a_failed_job_does_not_claim_its_stage_finished() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(stream)
    run_stages(display)
    display.close()
    assert stream.getvalue().splitlines() == ["fetch: 0.0%", "fetch: 100.0%", "convert: 0.0%"]


def test_human_sizes() -> None:
    assert [human_size(value) for value in (None, 0, 1023, 1024, 3 * 1024**3, 2**70)] == [
        "-",
        "0 B",
        "1023 B",
        "1.0 KiB",
        "3.0 GiB",
        "1024.0 EiB",
    ]


def test_user_text_cannot_drive_the_terminal() -> None:
    assert printable("a\x1b[2Jb\rc\nd\x9be\x7f") == "a\\x1b[2Jb\\x0dc\\x0ad\\x9be\\x7f"
    rows = dict(record_rows({"id": "x", "status": "killed", "reason": "no\r\nforged line", "retry": None}, None))
    assert rows["reason"] == "no\\x0d\\x0aforged line" and rows["retry"] == "-"
