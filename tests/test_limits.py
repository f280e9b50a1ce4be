"""qemu-img's limits and lifetime are applied by util-linux's setpriv and
prlimit in the child, not by Python code between fork and exec. A stand-in
for qemu-img (DISKPIPE_QEMU_IMG) reports what the child really got."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from diskpipe.converter import qemu_img
from diskpipe.converter.limits import Limits, convert_limits, limited_command
from tests.conftest import RECOVERY_TIMEOUT, process_alive, wait_until

STAND_IN = """#!/bin/sh
cat /proc/self/limits > "$DISKPIPE_TEST_OUT"
echo $$ > "$DISKPIPE_TEST_OUT.pid"
exec sleep "${DISKPIPE_TEST_SLEEP:-0}"
"""


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    script = tmp_path / "qemu-img"
    script.write_text(STAND_IN)
    script.chmod(0o755)
    out = tmp_path / "limits.txt"
    monkeypatch.setenv("DISKPIPE_QEMU_IMG", str(script))
    monkeypatch.setenv("DISKPIPE_TEST_OUT", str(out))
    return out


def _limit(report: str, name: str) -> tuple[str, str]:
    line = next(line for line in report.splitlines() if line.startswith(name))
    soft, hard = line[len(name) :].split()[:2]
    return soft, hard


def test_the_child_runs_under_every_limit(stand_in: Path) -> None:
    limits = convert_limits(3 << 30, to_file=True)
    qemu_img.run(["--version"], limits)
    report = stand_in.read_text()
    assert limits.address_space is not None and limits.cpu_seconds is not None and limits.file_size is not None
    assert _limit(report, "Max address space") == (str(limits.address_space),) * 2
    assert _limit(report, "Max cpu time") == (str(limits.cpu_seconds),) * 2
    assert _limit(report, "Max file size") == (str(limits.file_size),) * 2
    assert _limit(report, "Max core file size") == ("0", "0")


def test_an_unset_limit_stays_unset(stand_in: Path) -> None:
    qemu_img.run(["--version"], Limits(cpu_seconds=7))
    report = stand_in.read_text()
    assert _limit(report, "Max cpu time") == ("7", "7")
    assert _limit(report, "Max file size") == ("unlimited", "unlimited")


def test_the_limits_hold_against_qemu_img_itself(tmp_path: Path) -> None:
    """The real qemu-img under a 64 MiB address space cannot even start:
    the cap reaches the binary, not only the wrapper."""
    with pytest.raises(qemu_img.QemuImgError):
        qemu_img.run(["--version"], Limits(address_space=16 << 20))
    assert qemu_img.run(["--version"], Limits(address_space=1 << 30)).startswith("qemu-img")


def test_no_python_runs_between_fork_and_exec() -> None:
    command = limited_command(["qemu-img", "info"], Limits(cpu_seconds=1))
    assert os.path.basename(command[0]) == "setpriv" and "--pdeathsig" in command
    assert command[-2:] == ["qemu-img", "info"]
    source = Path(qemu_img.__file__).read_text()
    assert "preexec_fn" not in source


PARENT = """
import sys
from diskpipe.converter import qemu_img
from diskpipe.converter.limits import Limits
print("starting", flush=True)
qemu_img.run(["--version"], Limits(timeout=600))
"""


def test_the_child_dies_with_its_parent(stand_in: Path, tmp_path: Path) -> None:
    env = dict(os.environ, DISKPIPE_TEST_SLEEP="300")
    parent = subprocess.Popen([sys.executable, "-c", PARENT], env=env, stdout=subprocess.PIPE, text=True)
    pidfile = Path(f"{stand_in}.pid")
    # Python, diskpipe, setpriv, prlimit and the stand-in start first: slow on a busy machine.
    wait_until(lambda: None if pidfile.exists() and pidfile.read_text().strip() else "no pid yet", "the child started")
    child = int(pidfile.read_text())
    assert process_alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=RECOVERY_TIMEOUT)
    wait_until(lambda: f"{child} still runs" if process_alive(child) else None, "the child ending with its parent")
    assert parent.stdout is not None
    parent.stdout.close()
