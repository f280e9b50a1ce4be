"""Ctrl-C, SIGTERM and SIGHUP in the middle of `diskpipe convert` and
`diskpipe import`, into the file store and into RBD.

The command says at once on stderr that it is stopping, kills qemu-img,
removes the temporary image, ends an import's record `killed` with outcome
`cancelled`, and exits 128 + the signal's number; nothing is left in the
store or the staging directory. Real processes and real signals: each test
waits until qemu-img is converting into the temporary (on RBD: until qemu-img
watches it, so a killed qemu-img's lock is in the way), then holds qemu-img
still (SIGSTOP) so the signal lands mid-conversion on any machine, however
busy.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from diskpipe.jobs.records import SqliteRecords
from tests.conftest import (
    FAULT_TEST_TIMEOUT,
    RECOVERY_TIMEOUT,
    ROOT,
    Ceph,
    process_alive,
    qemu_img_children,
    wait_until,
)

pytestmark = pytest.mark.timeout(FAULT_TEST_TIMEOUT)

SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]


def with_stop_signals(*argv: str, ignored: tuple[signal.Signals, ...] = ()) -> list[str]:
    """`argv` started with the stop signals as a terminal gives them, whatever
    this process inherited (a suite run as a background job of a script
    ignores SIGINT, and children inherit that); `ignored`: these ignored
    instead, as `nohup` or such a background job leave them. GNU env sets
    them between fork and exec (a preexec_fn is unsafe beside threads)."""
    names = ",".join(signum.name.removeprefix("SIG") for signum in SIGNALS)
    prefix = ["env", f"--default-signal={names}"]
    if ignored:
        prefix.append("--ignore-signal=" + ",".join(signum.name.removeprefix("SIG") for signum in ignored))
    return [*prefix, *argv]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """1 GiB of a non-zero pattern as a compressed qcow2 (seconds of work for
    qemu-img, under a megabyte on disk), and the same gzip-compressed (an
    import then stages the unpacked layer)."""
    base = tmp_path_factory.mktemp("interrupt-sources")
    raw = base / "pattern.raw"
    chunk = b"\x5a" * (1 << 20)
    with raw.open("wb") as handle:
        for _ in range(1024):
            handle.write(chunk)
    image = base / "slow.qcow2"
    for options in (["-o", "compression_type=zstd"], []):  # zstd: compressed in seconds, where zlib takes 20
        made = subprocess.run(
            ["qemu-img", "convert", "-c", *options, "-f", "raw", "-O", "qcow2", str(raw), str(image)],
            capture_output=True,
            check=False,
        )
        if made.returncode == 0:
            break
    assert made.returncode == 0, made.stderr
    raw.unlink()
    packed = base / "slow.qcow2.gz"
    packed.write_bytes(gzip.compress(image.read_bytes()))
    return {"qcow2": image, "gz": packed}


class Store:
    """Where the command writes, and how a test looks into it."""

    def __init__(self, option: str, env: dict[str, str], temporaries: Callable[[str], list[str]]) -> None:
        self.option = option
        self.env = env
        self.temporaries = temporaries  # image id -> its names in the store (temporary or final)

    def watched(self, name: str) -> bool:
        return True


class RbdStore(Store):
    def __init__(self, ceph: Ceph) -> None:
        super().__init__(
            "rbd:rbd",
            {"DISKPIPE_RBD_CONF": ceph.conf},
            lambda image_id: [name for name in ceph.rbd("ls").split() if name.startswith(image_id)],
        )
        self.ceph = ceph

    def watched(self, name: str) -> bool:
        """qemu-img has the image open (its watch is what makes removal wait)."""
        status = subprocess.run(
            ["rbd", "-c", self.ceph.conf, "status", "--format", "json", name],
            capture_output=True,
            text=True,
            check=False,
        )
        return status.returncode == 0 and bool(json.loads(status.stdout or "{}").get("watchers"))


@pytest.fixture(params=["file", "rbd"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "rbd":
        return RbdStore(request.getfixturevalue("ceph"))
    directory = tmp_path / "store"
    return Store(
        f"file:{directory}",
        {},
        lambda image_id: (
            [entry.name for entry in directory.iterdir() if entry.name.lstrip(".").startswith(image_id)]
            if directory.is_dir()
            else []
        ),
    )


@pytest.mark.parametrize("command", ["convert", "import"])
@pytest.mark.parametrize("stop", SIGNALS, ids=[stop.name for stop in SIGNALS])
def test_a_stop_signal_mid_conversion_cleans_up_and_exits_128_plus_n(
    command: str, stop: signal.Signals, store: Store, sources: dict[str, Path], tmp_path: Path
) -> None:
    image_id = f"stop-{command}-{stop.name.lower()}-{os.getpid()}"
    staging = tmp_path / "staging"
    records = tmp_path / "records.sqlite"
    env = {key: value for key, value in os.environ.items() if not key.startswith("DISKPIPE_")}
    env.update(store.env, DISKPIPE_STORE_RECORDS=str(records), DISKPIPE_IMPORT_STAGING_DIR=str(staging))
    source = sources["gz" if command == "import" else "qcow2"]
    process = subprocess.Popen(
        with_stop_signals(
            sys.executable, "-m", "diskpipe", command, str(source), "--store", store.option, "--id", image_id, "--quiet"
        ),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    converters: list[int] = []
    try:

        def converting() -> str | None:
            nonlocal converters
            if process.poll() is not None:
                raise AssertionError(f"diskpipe ended early ({process.returncode}): {process.stderr.read()}")  # type: ignore[union-attr]
            converters = qemu_img_children(process.pid)
            temporaries = [name for name in store.temporaries(image_id) if ".tmp." in name]
            if not converters or not temporaries:
                return f"qemu-img {converters}, temporaries {temporaries}"
            return None if store.watched(temporaries[0]) else f"{temporaries[0]} not open in qemu-img yet"

        wait_until(converting, "qemu-img converting into the temporary", timeout=RECOVERY_TIMEOUT)
        for pid in converters:
            os.kill(pid, signal.SIGSTOP)  # mid-conversion for sure, however busy the machine
        assert store.temporaries(image_id), "the temporary exists while qemu-img is held"

        sent = time.monotonic()
        process.send_signal(stop)
        assert process.stderr is not None
        first_line = process.stderr.readline()  # said at once, before any cleanup
        assert first_line.startswith("diskpipe: stopping: removing the temporary image"), first_line
        assert stop.name in first_line
        returncode = process.wait(timeout=RECOVERY_TIMEOUT)
        took = time.monotonic() - sent
        rest = process.stderr.read()
    finally:
        for pid in converters:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if process.poll() is None:
            process.kill()
            process.wait()
    print(
        f"{command} into {store.option.split(':')[0]}, {stop.name}: exited {returncode} {took:.2f} s after the signal"
    )

    assert returncode == 128 + stop, rest
    wait_until(
        lambda: f"qemu-img {alive} still running" if (alive := [p for p in converters if process_alive(p)]) else None,
        "qemu-img killed",
    )
    assert store.temporaries(image_id) == []
    assert not staging.is_dir() or sorted(os.listdir(staging)) == []
    if command == "import":
        record = SqliteRecords(str(records)).get(image_id)
        assert record is not None
        assert (record["status"], record["outcome"]) == ("killed", "cancelled"), record
        assert record["reason"] == f"interrupted ({stop.name})"


def test_a_second_signal_does_not_cut_the_cleanup_short(ceph: Ceph, sources: dict[str, Path], tmp_path: Path) -> None:
    store = RbdStore(ceph)
    image_id = f"twice-{os.getpid()}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("DISKPIPE_")}
    env.update(store.env, DISKPIPE_STORE_RECORDS=str(tmp_path / "records.sqlite"))
    process = subprocess.Popen(
        with_stop_signals(
            sys.executable,
            "-m",
            "diskpipe",
            "convert",
            str(sources["qcow2"]),
            "--store",
            "rbd:rbd",
            "--id",
            image_id,
            "--quiet",
        ),
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    try:

        def converting() -> str | None:
            assert process.poll() is None, process.stderr.read()  # type: ignore[union-attr]
            temporaries = [name for name in store.temporaries(image_id) if ".tmp." in name]
            return None if temporaries and store.watched(temporaries[0]) else "no temporary open in qemu-img yet"

        wait_until(converting, "qemu-img converting into the temporary", timeout=RECOVERY_TIMEOUT)
        process.send_signal(signal.SIGINT)
        assert "stopping: removing the temporary image" in process.stderr.readline()
        # Fencing the killed qemu-img and removing the image takes a moment:
        # a hurried second Ctrl-C lands in it and must not cut it short.
        process.send_signal(signal.SIGINT)
        returncode = process.wait(timeout=RECOVERY_TIMEOUT)
        rest = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert returncode == 130, rest
    assert "still stopping" in rest
    assert store.temporaries(image_id) == []


# A command whose cleanup never ends, to see the third signal quit at once.
STUCK_CLEANUP = """
import sys, time
from diskpipe.interrupts import run

def handler(args):
    try:
        print("working", flush=True)
        time.sleep(600)
    finally:
        print("cleaning", flush=True)
        time.sleep(600)
    return 0

sys.exit(run(handler, type("Args", (), {"command": "convert"})()))
"""


def start_stuck_cleanup(ignored: tuple[signal.Signals, ...] = ()) -> subprocess.Popen[str]:
    return subprocess.Popen(
        with_stop_signals(sys.executable, "-c", STUCK_CLEANUP, ignored=ignored),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_third_signal_quits_at_once_and_says_what_is_left() -> None:
    process = start_stuck_cleanup()
    assert process.stdout is not None and process.stderr is not None
    try:
        assert process.stdout.readline() == "working\n"
        process.send_signal(signal.SIGTERM)
        assert "stopping: removing the temporary image (SIGTERM)" in process.stderr.readline()
        assert process.stdout.readline() == "cleaning\n"
        process.send_signal(signal.SIGHUP)
        assert "still stopping (SIGHUP)" in process.stderr.readline()
        process.send_signal(signal.SIGINT)
        assert "quitting at once (SIGINT)" in process.stderr.readline()
        assert process.wait(timeout=RECOVERY_TIMEOUT) == 128 + signal.SIGINT
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("ignored", [signal.SIGHUP, signal.SIGINT], ids=["nohup", "background-job"])
def test_a_stop_signal_ignored_at_start_stays_ignored(ignored: signal.Signals) -> None:
    """`nohup diskpipe import ...` outlives its terminal, and a script's
    background job is not stopped by the script's Ctrl-C: what the command
    was started ignoring, it ignores; the other stop signals still stop it."""
    process = start_stuck_cleanup(ignored=(ignored,))
    assert process.stdout is not None and process.stderr is not None
    try:
        assert process.stdout.readline() == "working\n"
        process.send_signal(ignored)
        process.send_signal(signal.SIGTERM)  # after it, in order: the first line says which stopped it
        assert "stopping: removing the temporary image (SIGTERM)" in process.stderr.readline()
        assert process.stdout.readline() == "cleaning\n"
    finally:
        process.kill()
        process.wait()
