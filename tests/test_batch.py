"""`inspect_many`: the entries `diskpipe info` prints for many files, in
order, whether one process or several inspect them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from diskpipe.formats.batch import (
    PARALLEL_FROM,
    REFUSED,
    UNREADABLE,
    Inspected,
    describe,
    inspect_many,
    usable_cpus,
    worker_count,
)
from diskpipe.formats.policy import Policy

DISKPIPE = [sys.executable, "-m", "diskpipe"]

# Forks made while a test watches (os.register_at_fork cannot be undone, so
# the hook stays registered and does nothing unless a file is set).
_fork_log: dict[str, Path | None] = {"path": None}


def _note_fork() -> None:
    path = _fork_log["path"]
    if path is not None:
        with path.open("a") as log:
            log.write(f"{os.getpid()}\n")


os.register_at_fork(after_in_child=_note_fork)


@pytest.fixture
def fork_log(tmp_path: Path) -> Any:
    path = tmp_path / "forks.log"
    path.touch()
    _fork_log["path"] = path
    try:
        yield path
    finally:
        _fork_log["path"] = None


@pytest.fixture
def mixed(samples_dir: Path, manifest: list[Any], tmp_path: Path) -> list[str]:
    """Every sample, a broken VHD and a missing file, interleaved."""
    broken = tmp_path / "broken.vhd"
    broken.write_bytes(b"conectix" + bytes(1000))
    paths = [str(samples_dir / entry.file) for entry in manifest]
    paths.insert(len(paths) // 3, str(broken))
    paths.insert(2 * len(paths) // 3, str(tmp_path / "missing.img"))
    return paths


def test_entries_are_what_diskpipe_info_prints(mixed: list[str]) -> None:
    chosen = mixed[:: max(1, len(mixed) // 12)] + [path for path in mixed if "broken" in path or "missing" in path]
    printed = subprocess.run(
        [*DISKPIPE, "info", "--output=json", *chosen], capture_output=True, text=True, check=False
    ).stdout
    results = inspect_many(chosen, jobs=1, policy=Policy())
    assert [result.entry for result in results] == json.loads(printed)


def test_order_and_entries_do_not_depend_on_the_workers(mixed: list[str], fork_log: Path) -> None:
    one = inspect_many(mixed, jobs=1, policy=Policy())
    assert fork_log.read_text() == ""
    two = inspect_many(mixed, jobs=2, policy=Policy())
    assert len(fork_log.read_text().split()) == 2  # two worker processes did the work
    assert two == one
    assert [result.entry.get("filename") for result in one] == mixed
    problems = {Path(result.entry["filename"]).name: result.problem for result in one if result.problem}
    assert problems == {"broken.vhd": REFUSED, "missing.img": UNREADABLE}
    assert all(result.entry["safe"] is False for result in one if result.problem)


def test_one_file_entry(samples_dir: Path, manifest: list[Any]) -> None:
    sample = next(entry for entry in manifest if entry.name == "hostile-qcow2-backing-passwd")
    result = describe(str(samples_dir / sample.file), Policy(), allocation=True)
    assert isinstance(result, Inspected) and result.problem is None
    assert result.entry["safe"] is False and "details" not in result.entry
    assert [issue["check"] for issue in result.entry["issues"]] == ["backing_file"]
    detailed = describe(str(samples_dir / sample.file), Policy(), details=True)
    assert "details" in detailed.entry


def test_a_directory_is_unreadable_not_a_crash(tmp_path: Path) -> None:
    (result,) = inspect_many([str(tmp_path)], jobs=1, policy=Policy())
    assert result.problem == UNREADABLE and result.entry["safe"] is False


def test_no_fork_beside_other_threads(mixed: list[str], fork_log: Path) -> None:
    """Forking a process while another thread holds a lock can deadlock the
    child: with a second thread alive the work stays in this process."""
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        results = inspect_many(mixed, jobs=2, policy=Policy())
    finally:
        release.set()
        other.join()
    assert fork_log.read_text() == ""
    assert results == inspect_many(mixed, jobs=1, policy=Policy())


def test_worker_count(monkeypatch: pytest.MonkeyPatch) -> None:
    cpus = usable_cpus()
    assert worker_count(PARALLEL_FROM - 1, None) == 1
    # The machine's load cannot be set from a test: the load average is the input faked here.
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert worker_count(1000, None) == cpus
    monkeypatch.setattr(os, "getloadavg", lambda: (cpus + 3.0, 0.0, 0.0))
    assert worker_count(1000, None) == 1  # every CPU busy: no workers forked onto them
    assert worker_count(3, 8) == 3
    assert worker_count(0, 4) == 1
    with pytest.raises(ValueError, match="at least 1"):
        worker_count(10, 0)


def test_no_files() -> None:
    assert inspect_many([], policy=Policy()) == []
