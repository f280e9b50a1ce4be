"""The job pipeline's fast layer: the whole import on the file store and
SQLite, no Ceph, no Redis, no Celery. Each step happens once (the store is
asked for each thing once, the stored image is read back at most once), and
every way a job ends maps to one outcome.

Real images and real qemu-img throughout; an exception is injected only for
the infrastructure faults that cannot be caused here for real (a store
that is unavailable, a bug at a step).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from diskpipe.converter.convert import ConvertRequest, convert_image
from diskpipe.converter.qemu_img import CancelToken
from diskpipe.converter.stores import file as file_store
from diskpipe.converter.stores.base import ImageProtected, StoreError, StoreUnavailable
from diskpipe.converter.stores.file import FileStore
from diskpipe.formats.policy import Policy
from diskpipe.jobs import pipeline
from diskpipe.jobs.errors import JobRefused, Transient
from diskpipe.jobs.management import cancel_image, delete_image, set_protected
from diskpipe.jobs.pipeline import Environment, ImportJob, run_import
from diskpipe.jobs.records import SqliteRecords, new_record
from diskpipe.jobs.states import OUTCOMES
from tests.conftest import RECOVERY_TIMEOUT, wait_until
from tests.test_convert import _hold_the_cross_check, _qemu_img_processes, _when_held

MiB = 1 << 20


class CountingTarget:
    """A store target that counts the bytes read from it."""

    def __init__(self, target: Any, reads: Counter[str]) -> None:
        self._target = target
        self._reads = reads

    def read_at(self, offset: int, length: int) -> bytes:
        data: bytes = self._target.read_at(offset, length)
        self._reads["bytes"] += len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


class CountingStore:
    """The real file store, with every call and every byte read back counted."""

    def __init__(self, store: FileStore) -> None:
        self.store = store
        self.calls: list[str] = []
        self.reads: Counter[str] = Counter()
        self.name = store.name
        self.capabilities = store.capabilities

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.store, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            result = method(*args, **kwargs)
            if name in ("begin", "open_image"):
                return CountingTarget(result, self.reads)
            return result

        return counted

    # Targets come back wrapped: unwrap them for the store's own methods.
    def seal(self, target: Any, cancel: CancelToken | None = None) -> None:
        self.calls.append("seal")
        self.store.seal(getattr(target, "_target", target), cancel)

    def finalize(self, target: Any) -> Any:
        self.calls.append("finalize")
        return self.store.finalize(getattr(target, "_target", target))

    def abort(self, target: Any) -> None:
        self.calls.append("abort")
        self.store.abort(getattr(target, "_target", target))


def _qcow2_with_data(path: Path, data_mib: int = 4, virtual: str = "64M") -> Path:
    raw = path.with_suffix(".raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), virtual], check=True)
    with raw.open("r+b") as handle:
        for index in range(data_mib):
            handle.seek(index * 8 * MiB)
            handle.write(bytes([index + 1]) * MiB)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
    raw.unlink()
    return path


def _environment(tmp_path: Path, store: Any = None) -> Environment:
    return Environment(
        records=SqliteRecords(str(tmp_path / "records.sqlite")),
        store=store if store is not None else FileStore(tmp_path / "store"),
        policy=Policy(),
        trust_local_paths=True,
    )


def test_an_import_asks_the_store_for_each_step_once_and_reads_the_image_back_once(tmp_path: Path) -> None:
    source = _qcow2_with_data(tmp_path / "disk.qcow2")
    store = CountingStore(FileStore(tmp_path / "store"))
    env = _environment(tmp_path, store)
    record = run_import(ImportJob("walk", str(source)), env, "a1")
    assert record["status"] == "active" and record["outcome"] == "active", record
    repeated = {name: count for name, count in Counter(store.calls).items() if count > 1}
    assert not repeated, f"store steps done more than once: {store.calls}"
    assert store.calls.index("begin") < store.calls.index("seal") < store.calls.index("finalize"), store.calls
    # Glance's hashes read the 4 MiB of data once; the holes are not read.
    assert 4 * MiB <= store.reads["bytes"] <= 5 * MiB, store.reads
    assert record["size"] == 64 * MiB and record["virtual_size"] == 64 * MiB


def test_without_hashes_nothing_but_a_few_blocks_is_read_back(tmp_path: Path) -> None:
    source = _qcow2_with_data(tmp_path / "disk.qcow2")
    store = CountingStore(FileStore(tmp_path / "store"))
    record = run_import(ImportJob("bare", str(source), full_hashes=False), _environment(tmp_path, store), "a1")
    assert record["status"] == "active", record
    assert store.reads["bytes"] < MiB, store.reads  # the re-inspection's header reads only


def test_a_dead_deliverys_stored_image_is_adopted_without_hashing_again(tmp_path: Path) -> None:
    source = _qcow2_with_data(tmp_path / "disk.qcow2")
    env = _environment(tmp_path)
    first = run_import(ImportJob("adopt", str(source)), env, "a1")
    assert first["status"] == "active"
    # The first delivery "died" after the rename, before recording: its
    # sealed checksums are in the record, the record still says saving.
    sealed = {"size": first["size"], "md5": first["checksum"], "sha512": first["os_hash_value"], "sparse": None}
    counting = CountingStore(env.store)  # type: ignore[arg-type]
    records = SqliteRecords(str(tmp_path / "records2.sqlite"))
    records.create(new_record("adopt", source=str(source), task_id="dead"))
    records.transition("adopt", "queued", "saving", sealed_checksums=sealed, attempts=1)
    adopted = run_import(ImportJob("adopt", str(source)), Environment(records=records, store=counting), "a2")
    assert adopted["status"] == "active" and adopted["checksum"] == first["checksum"], adopted
    assert "begin" not in counting.calls, counting.calls  # nothing converted again
    assert counting.reads["bytes"] < MiB, counting.reads  # format and size checked, data not hashed again


def test_refused_malformed_and_cancelled_images_end_with_their_outcome(tmp_path: Path) -> None:
    env = _environment(tmp_path)
    backing = tmp_path / "with-backing.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/hostname", str(backing), "16M"],
        check=True,
    )
    refused = run_import(ImportJob("refused", str(backing)), env, "a1")
    assert (refused["status"], refused["outcome"]) == ("killed", "refused"), refused
    assert "backing" in refused["reason"]

    truncated = tmp_path / "truncated.qcow2"
    truncated.write_bytes(_qcow2_with_data(tmp_path / "whole.qcow2").read_bytes()[:300])
    malformed = run_import(ImportJob("malformed", str(truncated)), env, "a1")
    assert (malformed["status"], malformed["outcome"]) == ("killed", "refused"), malformed

    source = _qcow2_with_data(tmp_path / "disk.qcow2")
    env.records.create(new_record("cancelled", source=str(source), task_id="a1"))
    cancelled = cancel_image("cancelled", env.records)
    assert (cancelled["status"], cancelled["outcome"]) == ("killed", "cancelled"), cancelled
    assert {refused["outcome"], malformed["outcome"], cancelled["outcome"]} <= OUTCOMES
    assert not list((tmp_path / "store").glob("*")), "a refused image left data behind"


@pytest.mark.parametrize(
    ("fault", "final", "outcome", "reason"),
    [
        (StoreUnavailable("Ceph did not answer"), False, None, None),
        (StoreUnavailable("Ceph did not answer"), True, "failed", "unavailable: Ceph did not answer"),
        (StoreError("pool is read-only"), True, "failed", "store error: pool is read-only"),
        (RuntimeError("a bug"), True, "failed", "internal error during convert: RuntimeError: a bug"),
    ],
)
def test_infrastructure_faults_fail_or_retry_but_never_refuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: Exception, final: bool, outcome: str | None, reason: str
) -> None:
    """Ceph away or a bug at a step cannot be caused here for real: the
    conversion step raises it."""

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise fault

    monkeypatch.setattr(pipeline, "convert_image", failing)
    source = _qcow2_with_data(tmp_path / "disk.qcow2")
    env = _environment(tmp_path)
    job = ImportJob("fault", str(source))
    if outcome is None:
        with pytest.raises(Transient):
            run_import(job, env, "a1", final_attempt=final)
        record = env.records.get("fault")
        assert record is not None and record["status"] == "saving" and not record.get("outcome")
        return
    record = run_import(job, env, "a1", final_attempt=final)
    assert (record["status"], record["outcome"], record["reason"]) == ("killed", outcome, reason)
    retried = run_import(job, env, "a2", final_attempt=True, retries_done=3)
    assert retried["reason"] == reason.replace("unavailable:", "gave up after 3 retries:"), retried


def test_protect_reaches_the_store_so_a_delete_around_the_records_is_refused(tmp_path: Path) -> None:
    source = _qcow2_with_data(tmp_path / "disk.qcow2")
    env = _environment(tmp_path)
    assert run_import(ImportJob("kept", str(source)), env, "a1")["status"] == "active"
    record = set_protected("kept", env, True)
    assert record["protected"] is True
    assert env.store.is_protected("kept")
    with pytest.raises(ImageProtected):
        env.store.delete("kept")
    with pytest.raises(JobRefused, match="protected"):
        delete_image("kept", env)
    set_protected("kept", env, False)
    assert not env.store.is_protected("kept")
    assert delete_image("kept", env)["status"] == "deleted"
    assert not env.store.exists("kept")


class TakenOverAt(CountingStore):
    """The real file store; at one step (`seal` or `finalize`) another
    delivery takes the job over first (the record moves to a newer attempt),
    as when this worker's lease expired while it worked."""

    def __init__(self, store: FileStore, records: SqliteRecords, image_id: str, step: str) -> None:
        super().__init__(store)
        self._records, self._image_id, self._step = records, image_id, step

    def _take_over(self) -> None:
        current = self._records.get(self._image_id)
        assert current is not None
        self._records.transition(self._image_id, "saving", "saving", attempts=current["attempts"] + 1, owner="next")

    def seal(self, target: Any, cancel: CancelToken | None = None) -> None:
        super().seal(target, cancel)
        if self._step == "seal":
            self._take_over()

    def finalize(self, target: Any) -> Any:
        location = super().finalize(target)
        if self._step == "finalize":
            self._take_over()
            # ... and the image under the name is no longer the one this
            # delivery hashed (the successor's, being written): verify fails.
            final = getattr(target, "_target", target).final_path
            with open(final, "r+b") as handle:
                handle.truncate(MiB)
        return location


def test_a_delivery_taken_over_before_it_records_its_checksums_leaves_nothing(tmp_path: Path) -> None:
    source = _qcow2_with_data(tmp_path / "disk.qcow2")
    env = _environment(tmp_path)
    store = TakenOverAt(env.store, env.records, "late", "seal")  # type: ignore[arg-type]
    record = run_import(ImportJob("late", str(source)), dataclasses.replace(env, store=store), "a1")
    assert record["status"] == "saving" and record["attempts"] == 2 and record["owner"] == "next", record
    assert record.get("sealed_checksums") is None, "a stale delivery left checksums for the next one to adopt"
    assert "finalize" not in store.calls and "abort" in store.calls, store.calls
    assert not FileStore(tmp_path / "store").exists("late")
    assert list((tmp_path / "store").iterdir()) == [], "the stale delivery's temporary is left"


def test_a_stale_delivery_whose_verify_fails_does_not_delete_its_successors_image(tmp_path: Path) -> None:
    source = _qcow2_with_data(tmp_path / "disk.qcow2")
    env = _environment(tmp_path)
    store = TakenOverAt(env.store, env.records, "kept", "finalize")  # type: ignore[arg-type]
    record = run_import(ImportJob("kept", str(source)), dataclasses.replace(env, store=store), "a1")
    assert record["status"] == "saving" and record["attempts"] == 2, record
    assert "delete" not in store.calls, store.calls
    assert FileStore(tmp_path / "store").exists("kept")


class RecordsAway(Exception):
    """The record store did not answer (Redis restarting): a retry error."""


class FenceCheckUnanswered(SqliteRecords):
    """Real SQLite records whose fenced check after a failed verify (an update
    with a fence and no field) finds the record store away, once: a moment an
    outage cannot be made to hit on purpose."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.unanswered = 0

    def update(self, image_id: str, *, fence: int | None = None, **changes: Any) -> dict[str, Any]:
        if fence is not None and not changes and not self.unanswered:
            self.unanswered += 1
            raise RecordsAway("records unreachable")
        return super().update(image_id, fence=fence, **changes)


class BrokenAfterFinalize(CountingStore):
    """The stored image is no longer the one hashed: verify fails."""

    def finalize(self, target: Any) -> Any:
        location = super().finalize(target)
        with open(getattr(target, "_target", target).final_path, "r+b") as handle:
            handle.truncate(MiB)
        return location


def test_an_image_that_failed_verify_is_not_adopted_when_the_fence_check_goes_unanswered(tmp_path: Path) -> None:
    """The delivery still holds its lease (none here: no other delivery), so
    the image it stored is its own: removed even though the record store did
    not answer, or the retry adopts the image that failed verification."""
    source = _qcow2_with_data(tmp_path / "disk.qcow2")
    env = dataclasses.replace(
        _environment(tmp_path),
        records=FenceCheckUnanswered(str(tmp_path / "records.sqlite")),
        store=BrokenAfterFinalize(FileStore(tmp_path / "store")),
        retry_errors=(RecordsAway,),
    )
    with pytest.raises((Transient, RecordsAway)):
        run_import(ImportJob("bad", str(source)), env, "a1", final_attempt=False)
    assert not FileStore(tmp_path / "store").exists("bad"), "the image that failed verify is left for the retry"
    retried = run_import(
        ImportJob("bad", str(source)), dataclasses.replace(env, store=FileStore(tmp_path / "store")), "a2"
    )
    assert retried["status"] == "active" and retried["virtual_size"] == 64 * MiB, retried


def test_a_stored_image_that_is_not_the_sealed_one_is_converted_again_not_adopted(tmp_path: Path) -> None:
    """A dead delivery's image whose size is not the one it sealed (it failed
    verify and could not be removed, or was changed since) is never adopted:
    it is removed and the source converted again."""
    source = _qcow2_with_data(tmp_path / "disk.qcow2")
    env = _environment(tmp_path)
    first = run_import(ImportJob("resealed", str(source)), env, "a1")
    assert first["status"] == "active"
    sealed = {"size": first["size"], "md5": first["checksum"], "sha512": first["os_hash_value"], "sparse": None}
    stored = next(path for path in (tmp_path / "store").iterdir() if path.name.startswith("resealed"))
    with open(stored, "r+b") as handle:
        handle.truncate(MiB)  # no longer what was sealed
    counting = CountingStore(env.store)  # type: ignore[arg-type]
    records = SqliteRecords(str(tmp_path / "records2.sqlite"))
    records.create(new_record("resealed", source=str(source), task_id="dead"))
    records.transition("resealed", "queued", "saving", sealed_checksums=sealed, attempts=1)
    again = run_import(
        ImportJob("resealed", str(source)), dataclasses.replace(env, records=records, store=counting), "a2"
    )
    assert again["status"] == "active" and again["virtual_size"] == 64 * MiB, again
    assert again["checksum"] == first["checksum"] and again["os_hash_value"] == first["os_hash_value"]
    assert counting.calls.index("delete") < counting.calls.index("begin"), counting.calls


# A worker's soft time limit (Celery raises SoftTimeLimitExceeded, an
# ordinary Exception, from its signal handler wherever the job is) lands at
# a moment a test cannot aim a real signal at: it is raised at that point.
# The record must say the job ran out of time (not refused, not a store
# error, not done), and nothing may be left behind or left running.
TIME_LIMITED = "time limit exceeded during convert"


def _time_limited(tmp_path: Path, **changes: Any) -> Environment:
    return dataclasses.replace(_environment(tmp_path), time_limit_errors=(SoftTimeLimitExceeded,), **changes)


class TimeLimitInBegin(FileStore):
    """The real file store, whose begin runs out of time once qemu-img's
    cross-check (beside it) has started and hangs."""

    def __init__(self, directory: Path, cross_check_pid: Path) -> None:
        super().__init__(directory)
        self.cross_check_pid = cross_check_pid
        self.raised = threading.Event()

    def begin(self, image_id: str, size: int, *, image_format: str = "raw") -> Any:
        wait_until(lambda: None if self.cross_check_pid.exists() else "no cross-check yet", "the cross-check")
        super().begin(image_id, size, image_format=image_format)  # its work done, the time runs out
        self.raised.set()
        raise SoftTimeLimitExceeded()


def test_a_time_limit_while_the_store_begins_stops_the_cross_check_and_ends_out_of_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not waited on like the store's own error (for a refusal that would
    win over it): the hanging cross-check is killed at once and the record
    says the time ran out, not that the image was refused."""
    marker = _hold_the_cross_check(tmp_path, monkeypatch)
    source = _qcow2_with_data(tmp_path / "disk.qcow2")
    store = TimeLimitInBegin(tmp_path / "store", marker)
    failures: list[str] = []
    watcher = _when_held(marker, store.raised, lambda: None, failures, resume=False)
    record = run_import(ImportJob("late", str(source)), _time_limited(tmp_path, store=store), "a1")
    watcher.join(RECOVERY_TIMEOUT)
    assert failures == []
    assert (record["status"], record["outcome"], record["reason"]) == ("killed", "failed", TIME_LIMITED), record
    assert _qemu_img_processes() == []
    assert list(store.directory.iterdir()) == []


class TimeLimitInProgressWrite(SqliteRecords):
    """Real SQLite records; the time limit lands while the conversion's
    progress is written (the record store answers: it is not away)."""

    def set_progress(self, image_id: str, progress: dict[str, Any]) -> None:
        if progress["stage"] == "convert":
            raise SoftTimeLimitExceeded()
        super().set_progress(image_id, progress)


def test_a_time_limit_during_a_progress_write_is_not_taken_for_the_record_store_away(tmp_path: Path) -> None:
    """Progress is best effort when the record store is away; a time limit
    is not swallowed with it (the job would run on until the hard limit
    kills the worker): qemu-img is killed, the temporary removed."""
    source = _qcow2_with_data(tmp_path / "disk.qcow2")
    env = _time_limited(tmp_path, records=TimeLimitInProgressWrite(str(tmp_path / "records.sqlite")))
    record = run_import(ImportJob("late", str(source)), env, "a1")
    assert (record["status"], record["outcome"], record["reason"]) == ("killed", "failed", TIME_LIMITED), record
    assert _qemu_img_processes() == []
    assert list((tmp_path / "store").iterdir()) == []


class TimeLimitWhileSealing(FileStore):
    """The real file store; the time limit lands while the written image is
    re-inspected, and the seal beside it fails at the same moment."""

    def begin(self, image_id: str, size: int, *, image_format: str = "raw") -> Any:
        target = super().begin(image_id, size, image_format=image_format)

        def out_of_time(offset: int, length: int) -> bytes:
            raise SoftTimeLimitExceeded()

        target.read_at = out_of_time  # type: ignore[method-assign]
        return target

    def seal(self, target: Any, cancel: CancelToken | None = None) -> None:
        raise StoreError("fsync failed: the disk went away")


@pytest.mark.parametrize(
    ("failure", "reason"),
    [(errno.EIO, "store error: cannot make"), (errno.ENOSPC, "unavailable: cannot make")],
    ids=["disk-failing", "disk-full"],
)
def test_an_fsync_that_fails_is_the_stores_failure_not_an_internal_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: int, reason: str
) -> None:
    """A disk that fails or fills up under fsync cannot be made to for real
    here: os.fsync answers as such a disk does."""
    source = _qcow2_with_data(tmp_path / "disk.qcow2")
    env = _environment(tmp_path)

    def fsync(fd: int) -> None:
        raise OSError(failure, os.strerror(failure))

    monkeypatch.setattr(file_store.os, "fsync", fsync)
    record = run_import(ImportJob("durable", str(source)), env, "a1")
    assert (record["status"], record["outcome"]) == ("killed", "failed"), record
    assert record["reason"].startswith(reason), record
    assert list(env.store.directory.iterdir()) == []  # type: ignore[attr-defined]


class SealFailsWhileHashing(FileStore):
    """The file store, hashed beside its seal (an fsync), whose fsync fails
    once the hashing has started."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.hashing = threading.Event()

    def seal(self, target: Any, cancel: CancelToken | None = None) -> None:
        assert self.hashing.wait(60), "the image was not hashed beside the seal"
        raise StoreError("fsync failed: the disk went away")


def test_a_seal_failing_while_the_image_is_hashed_is_the_error_seen(tmp_path: Path) -> None:
    source = _qcow2_with_data(tmp_path / "disk.qcow2", data_mib=8)
    store = SealFailsWhileHashing(tmp_path / "store")

    def progress(stage: str, percent: float) -> None:
        if stage == "checksum":
            store.hashing.set()

    with pytest.raises(StoreError, match="fsync failed"):
        convert_image(ConvertRequest(str(source), "sealing"), store, progress=progress)
    assert list(store.directory.iterdir()) == []


def test_a_time_limit_during_the_reinspection_is_not_replaced_by_the_seals_failure(tmp_path: Path) -> None:
    source = _qcow2_with_data(tmp_path / "disk.qcow2")
    store = TimeLimitWhileSealing(tmp_path / "store")
    record = run_import(ImportJob("late", str(source)), _time_limited(tmp_path, store=store), "a1")
    assert (record["status"], record["outcome"], record["reason"]) == ("killed", "failed", TIME_LIMITED), record
    assert list(store.directory.iterdir()) == []


class SealStillSending(FileStore):
    """The file store with a seal that, like an S3 part in flight, cannot be
    stopped halfway: it ends when the test lets it. It notes an abort that
    comes while it still runs."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.sealing = threading.Event()
        self.let_seal_end = threading.Event()
        self.seal_running = False
        self.aborted = threading.Event()
        self.aborted_while_sealing = False

    def seal(self, target: Any, cancel: CancelToken | None = None) -> None:
        self.seal_running = True
        self.sealing.set()
        try:
            assert self.let_seal_end.wait(120)
        finally:
            self.seal_running = False

    def abort(self, target: Any) -> None:
        self.aborted_while_sealing = self.aborted_while_sealing or self.seal_running
        self.aborted.set()
        super().abort(target)


def _main_thread_waits_for_the_seal() -> str | None:
    """The main thread blocked in threading (a join, a wait), called from
    the seal step after the hashing has left."""
    frame = sys._current_frames().get(threading.main_thread().ident or 0)
    innermost = frame.f_code.co_filename if frame is not None else ""
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    if innermost == threading.__file__ and "_seal_reinspect_and_hash" in names and "_read_back" not in names:
        return None
    return f"main thread in {names[:4]}"


def test_a_time_limit_while_a_cancelled_job_waits_for_its_seal_does_not_abort_beside_the_seal(tmp_path: Path) -> None:
    """The job is cancelled while its image is hashed beside the seal; the
    converter then waits for the seal (an S3 part in flight) before abort.
    The worker's soft time limit (SIGUSR1 -> SoftTimeLimitExceeded, as
    billiard sends it) lands during that wait: abort must still not run
    while the seal does (S3: the staged fd closed under a part being read,
    the upload aborted while a part still goes up)."""
    source = _qcow2_with_data(tmp_path / "disk.qcow2", data_mib=8)
    store = SealStillSending(tmp_path / "store")
    cancel = CancelToken()

    def progress(stage: str, percent: float) -> None:
        if stage == "checksum" and store.sealing.is_set():
            cancel.cancel()  # the job's cancel, heard by the hashing

    def time_limit(signum: int, frame: Any) -> None:
        raise SoftTimeLimitExceeded()

    def limit_lands_while_waiting() -> None:
        wait_until(_main_thread_waits_for_the_seal, "the converter waiting for the seal", timeout=120, interval=0.05)
        os.kill(os.getpid(), signal.SIGUSR1)
        store.aborted.wait(5)  # it must not come; the seal then ends
        store.let_seal_end.set()

    previous = signal.signal(signal.SIGUSR1, time_limit)
    helper = threading.Thread(target=limit_lands_while_waiting)
    helper.start()
    try:
        with pytest.raises((SoftTimeLimitExceeded, InterruptedError)):
            convert_image(ConvertRequest(str(source), "sealing"), store, progress=progress, cancel=cancel)
        assert not store.seal_running, "convert_image returned while the seal still ran"
        assert not store.aborted_while_sealing, "abort ran while the seal still ran"
    finally:
        store.let_seal_end.set()
        helper.join(130)
        signal.signal(signal.SIGUSR1, previous)
    assert list(store.directory.iterdir()) == []
