"""Conversion into the file store and a real one-node Ceph, against real
qemu-img: byte-identical output, thin RBD images, protected snapshots,
Glance's checksums, and nothing partial left behind after any failure."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from diskpipe.converter import qemu_img
from diskpipe.converter.convert import ConversionFailed, ConvertRequest, convert_image
from diskpipe.converter.qemu_img import Cancelled, CancelToken
from diskpipe.converter.stores.base import StoreMisconfigured, StoreUnavailable
from diskpipe.converter.stores.file import FileStore
from diskpipe.converter.stores.rbd import RbdConfig, RbdStore, qemu_rbd_target
from diskpipe.formats import inspect
from diskpipe.refusal import UnsafeImage
from tests.conftest import FAULT_TEST_TIMEOUT, RECOVERY_TIMEOUT, process_alive, qemu_img_children, wait_until

CONVERTIBLE = {"raw", "qcow2", "vpc", "vhdx", "vmdk", "vdi", "qed", "parallels"}
MAX_TEST_SIZE = 256 * 1024 * 1024  # hashing every byte of a 1 TiB disk is for benchmarks


def convertible(manifest: list[Any]) -> list[Any]:
    return [
        sample
        for sample in manifest
        if sample.group == "honest"
        and sample.verdict == "safe"
        and sample.format in CONVERTIBLE
        and sample.virtual_size <= MAX_TEST_SIZE
        and not sample.name.startswith(("luks", "qcow2-encrypt"))
    ]


def reference_raw(path: Path, fmt: str, out: Path, extra: list[str] | None = None) -> Path:
    source = extra or ["-f", fmt, str(path)]
    subprocess.run(["qemu-img", "convert", "-O", "raw", *source, str(out)], check=True, capture_output=True)
    return out


def digest(path: Path) -> tuple[str, str]:
    md5, sha512 = hashlib.md5(), hashlib.sha512()
    with path.open("rb") as handle:
        while chunk := handle.read(4 << 20):
            md5.update(chunk)
            sha512.update(chunk)
    return md5.hexdigest(), sha512.hexdigest()


def reference_for(sample: Any, path: Path, tmp_path: Path) -> Path:
    extra = None
    if sample.format == "vpc":
        from diskpipe.formats import inspect

        info = inspect(path)
        if (
            info.details.get("size-source") == "chs"
            and info.details["footer-current-size"] // 512 * 512 > info.virtual_size
        ):
            extra = ["--image-opts", f"driver=vpc,force_size_calc=current_size,file.filename={path}"]
    return reference_raw(path, sample.format, tmp_path / "reference.raw", extra)


@pytest.fixture
def rbd_store(ceph: Any) -> Any:
    store = RbdStore(RbdConfig(conf=ceph.conf, connect_timeout=10, op_timeout=20))
    yield store
    store.close()


def test_every_format_converts_into_the_file_store_byte_identical(
    manifest: list[Any], samples_dir: Path, tmp_path: Path
) -> None:
    store = FileStore(tmp_path / "store")
    samples = convertible(manifest)
    assert len(samples) >= 15
    for sample in samples:
        path = samples_dir / sample.file
        result = convert_image(ConvertRequest(str(path), f"f-{sample.name}"), store)
        stored = Path(result.location.metadata["path"])
        reference = reference_for(sample, path, tmp_path)
        assert stored.read_bytes() == reference.read_bytes(), sample.name
        assert (result.checksums.md5, result.checksums.sha512) == digest(reference), sample.name
        assert result.checksums.size == reference.stat().st_size
        reference.unlink()
    assert not [entry for entry in (tmp_path / "store").iterdir() if ".tmp." in entry.name]


def test_every_format_converts_into_rbd_thin_and_protected(
    manifest: list[Any], samples_dir: Path, tmp_path: Path, rbd_store: RbdStore, ceph: Any
) -> None:
    samples = convertible(manifest)
    for sample in samples:
        path = samples_dir / sample.file
        image_id = f"r-{sample.name}"
        result = convert_image(ConvertRequest(str(path), image_id), rbd_store)
        assert result.location.url == f"rbd://{rbd_store.fsid()}/rbd/{image_id}/snap"
        exported = tmp_path / "exported.raw"
        ceph.rbd("export", f"rbd/{image_id}@snap", str(exported))
        reference = reference_for(sample, path, tmp_path)
        assert exported.read_bytes() == reference.read_bytes(), sample.name
        with reference.open("rb") as handle:  # only md5: sha512 is the file store test's (same code)
            assert result.checksums.md5 == hashlib.file_digest(handle, "md5").hexdigest()
        # The snapshot's info tells the image's format and features too: one
        # CLI start (~0.4 s, 70 samples) instead of two.
        info = json.loads(ceph.rbd("info", "--format", "json", f"rbd/{image_id}@snap"))
        assert info["format"] == 2 and "layering" in info["features"] and info["protected"] == "true"
        snaps = json.loads(ceph.rbd("snap", "ls", "--format", "json", f"rbd/{image_id}"))
        assert [snap["name"] for snap in snaps] == ["snap"]
        if sample.virtual_size == 0:
            exported.unlink()
            reference.unlink()
            continue  # `rbd du` aborts on an empty image (a Ceph 16 bug)
        # Thin: RBD holds the 4 MiB objects that cover the data extents
        # (qemu-img map) holding any non-zero byte; zero blocks are never written.
        used = json.loads(ceph.rbd("du", "--format", "json", f"rbd/{image_id}"))["images"]
        used_bytes = sum(entry["used_size"] for entry in used)
        extents = json.loads(
            subprocess.run(
                ["qemu-img", "map", "--output=json", "-f", "raw", str(reference)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        objects = set()
        with reference.open("rb") as handle:
            for extent in extents:
                if not extent["data"]:
                    continue
                for number in range(extent["start"] >> 22, ((extent["start"] + extent["length"] - 1) >> 22) + 1):
                    start = max(extent["start"], number << 22)
                    end = min(extent["start"] + extent["length"], (number + 1) << 22)
                    handle.seek(start)
                    if handle.read(end - start).strip(b"\0"):
                        objects.add(number)
        size = reference.stat().st_size
        assert used_bytes == sum(min(4 << 20, size - (number << 22)) for number in objects), sample.name
        exported.unlink()
        reference.unlink()
    # (Images stay: removing a snapshot costs a monitor round of ~1 s each.)
    assert "tmp" not in ceph.rbd("ls")


def test_a_refused_image_never_reaches_qemu_img(
    samples_dir: Path, manifest: list[Any], tmp_path: Path, qemu_img_calls: list[list[str]]
) -> None:
    store = FileStore(tmp_path / "store")
    hostile = [
        sample for sample in manifest if sample.group == "hostile" and sample.verdict != "safe" and not sample.claimed
    ]
    assert hostile
    for sample in hostile:
        with pytest.raises(UnsafeImage):
            convert_image(ConvertRequest(str(samples_dir / sample.file), f"h-{sample.name}"), store)
    assert qemu_img_calls == []
    assert not list((tmp_path / "store").glob("*")) if (tmp_path / "store").exists() else True


class _WatchedFileStore(FileStore):
    """A file store that remembers the targets it began and aborted, and can
    fail its `begin` with a given error instead."""

    def __init__(self, directory: Path, begin_error: BaseException | None = None) -> None:
        super().__init__(directory)
        self.begin_error = begin_error
        self.begun: list[Any] = []
        self.aborted: list[Any] = []

    def begin(self, image_id: str, size: int, *, image_format: str = "raw") -> Any:
        if self.begin_error is not None:
            raise self.begin_error
        target = super().begin(image_id, size, image_format=image_format)
        self.begun.append(target)
        return target

    def abort(self, target: Any) -> None:
        self.aborted.append(target)
        super().abort(target)


def _convert_with_facts_qemu_disputes(tmp_path: Path, store: FileStore) -> Any:
    """Convert a raw file with the facts of a qcow2 (as an inspector bug
    would give them): the policy accepts them, and qemu-img's cross-check,
    asked to read the raw file as qcow2, disagrees."""
    qcow2 = tmp_path / "facts.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "16M"], check=True)
    facts = inspect(qcow2, allocation=True)
    raw = tmp_path / "upload.raw"
    raw.write_bytes(bytes(1 << 20))
    fd = os.open(raw, os.O_RDONLY)
    try:
        return convert_image(ConvertRequest(str(raw), "disputed", source_fd=fd), store, inspected=facts)
    finally:
        os.close(fd)


def test_a_cross_check_refusal_removes_the_target_created_beside_it(tmp_path: Path) -> None:
    """The store's target is created while qemu-img's cross-check runs; when
    qemu-img disagrees, nothing is converted and the empty target goes."""
    store = _WatchedFileStore(tmp_path / "store")
    with pytest.raises(UnsafeImage) as refused:
        _convert_with_facts_qemu_disputes(tmp_path, store)
    assert [issue.check for issue in refused.value.issues] == ["cross_check"]
    assert "cannot open the image as qcow2" in str(refused.value)
    assert len(store.begun) == 1 and store.aborted == store.begun
    assert list((tmp_path / "store").iterdir()) == []


def test_a_cross_check_refusal_wins_over_a_store_failing_meanwhile(tmp_path: Path) -> None:
    """The image's fault is reported, not the store's trouble at the same
    moment (as when the cross-check ran before the store was touched)."""
    store = _WatchedFileStore(tmp_path / "store", begin_error=StoreUnavailable("the store is down"))
    with pytest.raises(UnsafeImage) as refused:
        _convert_with_facts_qemu_disputes(tmp_path, store)
    assert [issue.check for issue in refused.value.issues] == ["cross_check"]


def test_an_interrupt_while_the_target_is_created_is_what_the_caller_sees(tmp_path: Path) -> None:
    """Ctrl-C during the store's begin: the interruption propagates (not the
    cross-check's outcome), and no qemu-img is left running."""
    store = _WatchedFileStore(tmp_path / "store", begin_error=KeyboardInterrupt())
    source = tmp_path / "honest.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(source), "16M"], check=True)
    with pytest.raises(KeyboardInterrupt):
        convert_image(ConvertRequest(str(source), "interrupted"), store)
    assert _qemu_img_processes() == []
    assert not (tmp_path / "store").exists() or list((tmp_path / "store").iterdir()) == []


# qemu-img whose `info` (the cross-check) writes its pid and then stands
# still (SIGSTOP) until it is continued or killed: a cross-check that hangs
# (a stalled disk or network filesystem under the source), made certain.
HELD_INFO = """#!/bin/sh
if [ "$1" = info ]; then
    echo $$ > "{marker}.part" && mv "{marker}.part" "{marker}"
    kill -STOP $$
fi
exec {qemu_img} "$@"
"""
# "At once": well before the cross-check's own wall-clock timeout (120 s),
# and generous for a busy machine (the kill takes one 0.2 s poll).
KILLED_WITHIN = qemu_img.INFO_LIMITS.timeout / 4


def _hold_the_cross_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make qemu-img's cross-check hang; the file its pid will appear in."""
    marker = tmp_path / "cross-check.pid"
    script = tmp_path / "qemu-img-held-info"
    script.write_text(HELD_INFO.format(marker=marker, qemu_img=qemu_img.qemu_img_binary()))
    script.chmod(0o755)
    monkeypatch.setenv("DISKPIPE_QEMU_IMG", str(script))
    return marker


def _held_pid(marker: Path) -> int | None:
    return int(marker.read_text()) if marker.exists() else None


def _when_held(
    marker: Path, ready: threading.Event, act: Any, failures: list[str], *, resume: bool
) -> threading.Thread:
    """Once the cross-check hangs and `ready` is set, `act()`; then the
    held qemu-img must be killed at once. If it is not, that is recorded,
    and it is continued (`resume`: the conversion may go on) or killed, so
    the test ends either way."""

    def watch() -> None:
        deadline = time.monotonic() + RECOVERY_TIMEOUT
        while (_held_pid(marker) is None or not ready.is_set()) and time.monotonic() < deadline:
            time.sleep(0.01)
        pid = _held_pid(marker)
        if pid is None:
            failures.append("the cross-check never ran")
            return
        act()
        deadline = time.monotonic() + KILLED_WITHIN
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if process_alive(pid):
            failures.append(f"the cross-check's qemu-img still ran {KILLED_WITHIN:.0f} s after it was stopped")
            os.kill(pid, signal.SIGCONT if resume else signal.SIGKILL)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


class _StoreThatWaits(FileStore):
    """A file store whose begin fails at once, succeeds, or never ends (a
    store that does not answer); `settled` is set once begin has returned or
    raised, `entered` when it started."""

    def __init__(self, directory: Path, how: str) -> None:
        super().__init__(directory)
        self.how = how
        self.entered = threading.Event()
        self.settled = threading.Event()

    def begin(self, image_id: str, size: int, *, image_format: str = "raw") -> Any:
        self.entered.set()
        try:
            if self.how == "fails":
                raise StoreUnavailable("the store is down")
            while self.how == "hangs":
                time.sleep(0.05)
            return super().begin(image_id, size, image_format=image_format)
        finally:
            self.settled.set()


@pytest.mark.usefixtures("ctrl_c_raises")
@pytest.mark.parametrize("store_begin", ["fails", "succeeds", "hangs"])
def test_an_interrupt_kills_a_hanging_cross_check_at_once(
    store_begin: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (SIGINT here; SIGTERM takes the same path, diskpipe.interrupts)
    while qemu-img's cross-check hangs: whatever the store's begin did
    meanwhile (failed, and the refusal it might be is awaited; created the
    target; or still waits), qemu-img is killed at once, the interruption is
    what the caller sees and nothing is left in the store."""
    marker = _hold_the_cross_check(tmp_path, monkeypatch)
    source = tmp_path / "honest.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(source), "16M"], check=True)
    store = _StoreThatWaits(tmp_path / "store", store_begin)
    main = threading.main_thread().ident
    assert main is not None and threading.get_ident() == main
    failures: list[str] = []
    ready = store.entered if store_begin == "hangs" else store.settled
    watcher = _when_held(marker, ready, lambda: signal.pthread_kill(main, signal.SIGINT), failures, resume=False)
    with pytest.raises(KeyboardInterrupt):
        convert_image(ConvertRequest(str(source), "interrupted"), store)
    watcher.join(RECOVERY_TIMEOUT)
    assert failures == []
    assert _qemu_img_processes() == []
    assert not store.directory.exists() or list(store.directory.iterdir()) == []


def test_a_cancel_during_the_cross_check_stops_it_and_nothing_is_converted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The conversion is cancelled (a user's cancel, a lost lease) while
    qemu-img's cross-check runs: the cross-check is killed at once, qemu-img
    convert never starts (its stage is never reported, as before the target
    was created beside the cross-check) and the target is removed."""
    marker = _hold_the_cross_check(tmp_path, monkeypatch)
    source = tmp_path / "honest.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(source), "16M"], check=True)
    store = _WatchedFileStore(tmp_path / "store")
    token = CancelToken()
    stages: list[str] = []
    failures: list[str] = []
    always = threading.Event()
    always.set()
    watcher = _when_held(marker, always, token.cancel, failures, resume=True)
    with pytest.raises(Cancelled):
        convert_image(
            ConvertRequest(str(source), "cancelled"),
            store,
            cancel=token,
            progress=lambda stage, percent: stages.append(stage),
        )
    watcher.join(RECOVERY_TIMEOUT)
    assert failures == []
    assert "convert" not in stages
    assert store.aborted == store.begun
    assert _qemu_img_processes() == []
    assert not store.directory.exists() or list(store.directory.iterdir()) == []


def test_a_token_with_a_parent_stops_with_either_and_never_stops_its_parent() -> None:
    """One step's stop inside a whole conversion's: the conversion's cancel
    reaches the step, the step's own stop does not reach the conversion."""
    conversion = CancelToken()
    step = CancelToken(parent=conversion)
    step.cancel()
    assert step.cancelled and not conversion.cancelled
    conversion.raise_if_cancelled()
    with pytest.raises(Cancelled):
        step.raise_if_cancelled()

    conversion = CancelToken()
    step = CancelToken(parent=CancelToken(parent=conversion))  # through more than one level
    assert not step.cancelled
    conversion.cancel()
    assert step.cancelled and not step.event.is_set()
    with pytest.raises(Cancelled):
        step.raise_if_cancelled()


def _qemu_img_processes() -> list[int]:
    """Any qemu-img child of this test process (info or convert)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        name, _, rest = stat_line.partition(" (")[2].rpartition(")")
        if name.startswith("qemu-img") and int(rest.split()[1]) == os.getpid():
            found.append(int(entry.name))
    return found


def _slow_source(tmp_path: Path) -> Path:
    """A qcow2 with enough random data that converting it takes a moment."""
    raw = tmp_path / "data.raw"
    with raw.open("wb") as handle:
        for _ in range(48):
            handle.write(os.urandom(1 << 20))
    source = tmp_path / "slow.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(source)], check=True)
    raw.unlink()
    return source


@pytest.mark.timeout(FAULT_TEST_TIMEOUT)
@pytest.mark.usefixtures("ceph_recovers")
def test_cancel_kills_qemu_img_and_leaves_nothing(tmp_path: Path, rbd_store: RbdStore, ceph: Any) -> None:
    source = _slow_source(tmp_path)
    token = CancelToken()
    started = threading.Event()

    def progress(stage: str, percent: float) -> None:
        if stage == "convert":
            started.set()

    canceller = threading.Timer(0.05, lambda: started.wait(RECOVERY_TIMEOUT) and token.cancel())
    canceller.daemon = True
    canceller.start()
    with pytest.raises(Cancelled):
        convert_image(
            ConvertRequest(str(source), "cancelled", options=qemu_img.ConvertOptions(coroutines=1)),
            rbd_store,
            progress=progress,
            cancel=token,
        )
    assert "cancelled" not in ceph.rbd("ls")
    assert not qemu_img_children()


KILL_SCRIPT = """
import sys
from diskpipe.converter.convert import ConvertRequest, convert_image
from diskpipe.converter.stores.rbd import RbdConfig, RbdStore
store = RbdStore(RbdConfig(conf=sys.argv[3]))
def progress(stage, percent):
    if stage == "convert" and percent > 0:
        print("converting", flush=True)
convert_image(ConvertRequest(sys.argv[1], sys.argv[2]), store, progress=progress)
"""


@pytest.mark.timeout(FAULT_TEST_TIMEOUT)
@pytest.mark.usefixtures("ceph_recovers")
@pytest.mark.parametrize("victim", ["qemu-img", "python"])
def test_a_conversion_killed_midway_leaves_no_image_and_the_next_run_succeeds(
    victim: str, tmp_path: Path, rbd_store: RbdStore, ceph: Any
) -> None:
    source = _slow_source(tmp_path)
    image_id = f"killed-{victim}"
    process = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(source), image_id, ceph.conf], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "converting"
    converters = qemu_img_children(process.pid)
    assert converters
    if victim == "qemu-img":
        for pid in converters:
            os.kill(pid, signal.SIGKILL)
    else:
        process.kill()
    process.wait(timeout=RECOVERY_TIMEOUT)
    # qemu-img dies with its parent (PR_SET_PDEATHSIG).
    wait_until(
        lambda: f"qemu-img {running} still running" if (running := _running(converters)) else None, "qemu-img gone"
    )
    names = ceph.rbd("ls").split()
    assert image_id not in names  # never a half image under the real name
    # The next run cleans the dead owner's temporary and succeeds.
    removed = rbd_store.cleanup()
    assert all(entry.removed and entry.name.startswith(image_id + ".tmp.") for entry in removed)
    assert not [name for name in ceph.rbd("ls").split() if name.startswith(image_id)]
    result = convert_image(ConvertRequest(str(source), image_id), rbd_store)
    assert result.location.url.endswith(f"/{image_id}/snap")
    rbd_store.delete(image_id)


def _running(pids: list[int]) -> list[int]:
    return [pid for pid in pids if process_alive(pid)]


def test_disk_full_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, check=False
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        source = tmp_path / "big.qcow2"
        raw = tmp_path / "big.raw"
        raw.write_bytes(os.urandom(32 << 20))
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(source)], check=True)
        store = FileStore(mount / "store")
        with pytest.raises((StoreUnavailable, ConversionFailed)) as failure:
            convert_image(ConvertRequest(str(source), "full"), store)
        assert "No space left" in str(failure.value)
        assert list((mount / "store").iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_an_unreachable_cluster_is_a_clear_error_within_seconds(tmp_path: Path) -> None:
    conf = tmp_path / "nowhere.conf"
    conf.write_text("[global]\nmon host = 127.0.0.1:1\nauth_client_required = none\n")
    store = RbdStore(RbdConfig(conf=str(conf), connect_timeout=3, op_timeout=3))
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="unreachable"):
        store.begin("x", 1 << 20)
    assert time.monotonic() - started < 30  # a hang guard, not a speed test


def test_cephx_auth_and_quoted_rbd_options(
    tmp_path: Path, ceph_cephx: Any, manifest: list[Any], samples_dir: Path
) -> None:
    # A keyring path with characters qemu's rbd: syntax must escape.
    odd = tmp_path / "key:ring@dir"
    odd.mkdir()
    keyring = odd / "client.diskpipe.keyring"
    keyring.write_text(Path(ceph_cephx.keyring).read_text())
    config = RbdConfig(conf=ceph_cephx.conf, user="diskpipe", keyring=str(keyring))
    assert "key\\:ring\\@dir" in qemu_rbd_target(config, "img")
    store = RbdStore(config)
    sample = next(sample for sample in convertible(manifest) if sample.format == "qcow2")
    result = convert_image(ConvertRequest(str(samples_dir / sample.file), "cephx-img"), store)
    assert result.location.url.endswith("/cephx-img/snap")
    store.delete("cephx-img")
    wrong = RbdStore(RbdConfig(conf=ceph_cephx.conf, user="nobody", keyring=str(keyring), connect_timeout=5))
    with pytest.raises(StoreMisconfigured, match=r"client\.nobody"):  # a setup mistake, not an outage
        wrong.begin("never", 1 << 20)
