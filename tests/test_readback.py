"""The stored image is read back once: each allocated byte of the stored
image (on RBD, after sealing, its protected snapshot) is read one time and
feeds every digest asked for; verify reads no data; a re-run that finds the image
already stored takes the checksums its dead predecessor recorded before the
rename instead of hashing again. Real qemu-img, a real one-node Ceph, the
embedded pipeline with its SQLite records."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from diskpipe.converter.checksums import SPARSE_BLOCK, data_ranges
from diskpipe.converter.stores.file import FileStore, FileTarget
from diskpipe.converter.stores.rbd import RbdConfig, RbdStore, RbdTarget
from diskpipe.jobs import sources
from diskpipe.jobs.pipeline import Environment, ImportJob, run_import
from diskpipe.jobs.records import SqliteRecords

MiB = 1 << 20
# Where the source holds data: (offset, length), scattered over 64 MiB.
DATA = ((0, 3 * MiB), (9 * MiB + 4096, 5 * MiB), (40 * MiB, 8 * MiB - 512), (63 * MiB, MiB))
SIZE = 64 * MiB
# The re-inspection reads the head and tail of the raw image: a few blocks.
REINSPECTION_BOUND = 2 * MiB


def make_qcow2(directory: Path) -> tuple[Path, bytes]:
    """A qcow2 holding random data in DATA; returns it and its raw bytes."""
    raw = bytearray(SIZE)
    for number, (offset, length) in enumerate(DATA):
        raw[offset : offset + length] = hashlib.shake_256(bytes([number])).digest(length)
    raw_path = directory / "source.raw"
    raw_path.write_bytes(raw)
    qcow2 = directory / "source.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw_path), str(qcow2)], check=True)
    raw_path.unlink()
    return qcow2, bytes(raw)


def sparse_digest(raw: bytes) -> str:
    """diskpipe's sparse digest, written out from its definition."""
    digest = hashlib.sha256()
    for offset in range(0, len(raw), SPARSE_BLOCK):
        block = raw[offset : offset + SPARSE_BLOCK]
        if block.count(0) != len(block):
            digest.update(offset.to_bytes(8, "big") + block)
    digest.update(len(raw).to_bytes(8, "big"))
    return digest.hexdigest()


class ReadCounter:
    """Counts the bytes read through a target class's read_at: before the
    extents are first listed (the re-inspection) and after (the hashing),
    and how many of the latter did not come from the sealed image (RBD:
    its snapshot)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, target_class: Any) -> None:
        self.before_extents = 0
        self.after_extents = 0
        self.after_extents_unsealed = 0
        self.extents: list[tuple[int, int, bool]] = []
        original_read, original_extents = target_class.read_at, target_class.extents

        def read_at(target: Any, offset: int, length: int) -> bytes:
            data: bytes = original_read(target, offset, length)
            if not self.extents:
                self.before_extents += len(data)
                return data
            self.after_extents += len(data)
            # A file is sealed by fsync: it has no separate handle to check.
            if not getattr(target, "_image_is_snapshot", isinstance(target, FileTarget)):
                self.after_extents_unsealed += len(data)
            return data

        def extents(target: Any) -> Iterator[tuple[int, int, bool]]:
            found = list(original_extents(target))
            self.extents = found
            yield from found

        monkeypatch.setattr(target_class, "read_at", read_at)
        monkeypatch.setattr(target_class, "extents", extents)

    @property
    def total(self) -> int:
        return self.before_extents + self.after_extents


def environment(tmp_path: Path, store: Any) -> Environment:
    config = sources.ImportConfig(staging_dir=str(tmp_path / "staging"))
    return Environment(
        records=SqliteRecords(str(tmp_path / "records.db")),
        store=store,
        import_config=config,
        trust_local_paths=True,
    )


@pytest.fixture
def rbd_store(ceph: Any) -> Iterator[RbdStore]:
    store = RbdStore(RbdConfig(conf=ceph.conf, connect_timeout=10, op_timeout=20))
    yield store
    store.close()


def counted_rbd_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: RbdStore, image_id: str, **job_options: Any
) -> tuple[dict[str, Any], ReadCounter, bytes]:
    """Import a fresh qcow2 into `store`, counting what is read back from its
    target: the record (active), the counter and the image's raw bytes."""
    source, raw = make_qcow2(tmp_path)
    counter = ReadCounter(monkeypatch, RbdTarget)
    record = run_import(ImportJob(image_id, str(source), **job_options), environment(tmp_path, store), "attempt-1")
    assert record["status"] == "active", record.get("reason")
    return record, counter, raw


def test_the_pipeline_reads_the_sealed_snapshot_once_and_records_its_hashes(
    tmp_path: Path, rbd_store: RbdStore, ceph: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    record, counter, raw = counted_rbd_import(tmp_path, monkeypatch, rbd_store, "readonce-rbd", sparse_hash=True)

    # One pass: what the hashes need (the data extents, widened to 64 KiB
    # blocks for the sparse digest), read from the snapshot exactly once;
    # before it only the re-inspection's few blocks; verify reads nothing.
    allocated = sum(end - start for start, end in data_ranges(counter.extents, SIZE))
    assert sum(length for _, length in DATA) <= allocated < SIZE // 2
    assert counter.after_extents == allocated
    assert counter.after_extents_unsealed == 0
    assert 0 < counter.before_extents <= REINSPECTION_BOUND

    # What is recorded is what is stored: hashlib over the snapshot's bytes.
    exported = tmp_path / "exported.raw"
    ceph.rbd("export", "rbd/readonce-rbd@snap", str(exported))
    stored = exported.read_bytes()
    assert stored == raw
    assert record["checksum"] == hashlib.md5(stored).hexdigest()
    assert record["os_hash_value"] == hashlib.sha512(stored).hexdigest()
    assert record["diskpipe_sparse_hash_value"] == sparse_digest(stored)
    assert record["size"] == SIZE
    assert not record.get("sealed_checksums")


def test_no_hashes_reads_back_only_the_reinspection(
    tmp_path: Path, rbd_store: RbdStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    record, counter, _ = counted_rbd_import(tmp_path, monkeypatch, rbd_store, "readonce-nohash", full_hashes=False)
    assert 0 < counter.total <= REINSPECTION_BOUND
    assert record["size"] == record["virtual_size"] == SIZE
    assert record["checksum"] is None and record["os_hash_value"] is None
    assert "diskpipe_sparse_hash_value" not in record


def _die_after_the_rename(job: ImportJob, tmp_path: Path) -> None:
    """A delivery killed between storing the image and recording it."""
    store = FileStore(tmp_path / "store")
    finalize = store.finalize

    def finalize_then_die(target: Any) -> Any:
        finalize(target)
        os._exit(17)

    store.finalize = finalize_then_die  # type: ignore[method-assign]
    run_import(job, environment(tmp_path, store), "attempt-1")


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "not-recorded"])
def test_a_rerun_adopts_the_stored_image_without_hashing_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorded: bool
) -> None:
    source, raw = make_qcow2(tmp_path)
    job = ImportJob("readonce-adopt", str(source), sparse_hash=True)
    child = multiprocessing.get_context("fork").Process(target=_die_after_the_rename, args=(job, tmp_path))
    child.start()
    child.join(120)
    assert child.exitcode == 17
    env = environment(tmp_path, FileStore(tmp_path / "store"))
    left = env.records.get(job.image_id)
    assert left is not None and left["status"] == "saving" and left["sealed_checksums"]["size"] == SIZE
    if not recorded:  # a delivery of an older diskpipe recorded nothing before the rename
        env.records.update(job.image_id, sealed_checksums=None)

    counter = ReadCounter(monkeypatch, FileTarget)
    record = run_import(job, env, "attempt-1")
    assert record["status"] == "active", record.get("reason")
    if recorded:
        assert counter.total <= REINSPECTION_BOUND  # format and size checked, no data hashed
    else:
        allocated = sum(end - start for start, end in data_ranges(counter.extents, SIZE))
        assert counter.total >= allocated >= sum(length for _, length in DATA)
    stored = (tmp_path / "store" / "readonce-adopt.raw").read_bytes()
    assert stored == raw
    assert record["checksum"] == hashlib.md5(stored).hexdigest()
    assert record["os_hash_value"] == hashlib.sha512(stored).hexdigest()
    assert record["diskpipe_sparse_hash_value"] == sparse_digest(stored)
    assert not record.get("sealed_checksums")
