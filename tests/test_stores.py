"""One store contract, checked on every store: the file store, RBD on a real
one-node Ceph, and S3 on Ceph's own RADOS Gateway. Then the S3 store's
faults: a gateway stopped mid-upload, wrong credentials, a missing bucket."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from billiard.pool import soft_timeout_sighandler
from celery.exceptions import SoftTimeLimitExceeded

from diskpipe.converter.checksums import hash_image
from diskpipe.converter.convert import ConvertRequest, convert_image
from diskpipe.converter.qemu_img import Cancelled, CancelToken
from diskpipe.converter.stores import registry
from diskpipe.converter.stores.base import (
    ImageExists,
    ImageNotFound,
    ImageProtected,
    Store,
    StoreError,
    StoreUnavailable,
)
from diskpipe.converter.stores.file import FileStore
from diskpipe.converter.stores.rbd import RbdConfig, RbdStore
from diskpipe.converter.stores.s3 import S3Config, S3Store
from tests.conftest import FAULT_TEST_TIMEOUT, RECOVERY_TIMEOUT

KINDS = ["file", "rbd", "s3"]
MiB = 1 << 20
SIZE = 12 * MiB  # more than two 5 MiB S3 parts, so uploads are multipart
URL_SCHEMES = {"file": "file://", "rbd": "rbd://", "s3": "s3://"}


def s3_config(rgw: Any, bucket: str, staging: Path, **overrides: Any) -> S3Config:
    values: dict[str, Any] = {
        "bucket": bucket,
        "endpoint": rgw.endpoint,
        "access_key": rgw.access_key,
        "secret_key": rgw.secret_key,
        "addressing": "path",
        "part_size": 5 * MiB,
        "threads": 2,
        "connect_timeout": 5,
        "read_timeout": 30,
        "max_attempts": 2,
        "staging_dir": str(staging),
    }
    values.update(overrides)
    return S3Config(**values)


@pytest.fixture
def staging(tmp_path: Path) -> Iterator[Path]:
    """The S3 store's staging directory: empty again after every test."""
    directory = tmp_path / "staging"
    directory.mkdir()
    yield directory
    assert list(directory.iterdir()) == [], "a staged file was left behind"


@pytest.fixture(params=KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path, staging: Path) -> Iterator[Store]:
    kind = request.param
    if kind == "file":
        yield FileStore(tmp_path / "images")
    elif kind == "rbd":
        ceph = request.getfixturevalue("ceph")
        rbd_store = RbdStore(RbdConfig(conf=ceph.conf, connect_timeout=10, op_timeout=20))
        yield rbd_store
        rbd_store.close()
    else:
        rgw = request.getfixturevalue("rgw")
        yield S3Store(s3_config(rgw, rgw.bucket(), staging))


def image_id() -> str:
    return f"contract-{uuid.uuid4().hex[:10]}"


# Data at the start, in the middle (across the 5 MiB S3 part boundary) and at
# the very end; the rest stays zero.
PIECES = [(0, b"\x01" * 4096), (5 * MiB - 1000, os.urandom(3000)), (SIZE - 777, os.urandom(777))]


def expected_bytes() -> bytes:
    data = bytearray(SIZE)
    for offset, piece in PIECES:
        data[offset : offset + len(piece)] = piece
    return bytes(data)


def half_written(store: Store, data: bytes) -> tuple[str, Any]:
    """A new image's target with `data` written at its start, neither
    aborted nor finalized: its name and the target."""
    name = image_id()
    target = store.begin(name, SIZE)
    target.write_at(0, data)
    return name, target


def store_image(store: Store, name: str) -> None:
    target = store.begin(name, SIZE)
    try:
        for offset, piece in PIECES:
            target.write_at(offset, piece)
        store.seal(target)
        store.finalize(target)
    except BaseException:
        store.abort(target)
        raise


def read_back(store: Store, name: str) -> bytes:
    image = store.open_image(name)
    try:
        size = image.stored_size()
        return b"".join(image.read_at(offset, min(4 * MiB, size - offset)) for offset in range(0, size, 4 * MiB))
    finally:
        image.close()


def temporaries(store: Store, name: str) -> list[str]:
    """What the store still holds of `name` besides the image (listed the
    store's own way, not through the code under test)."""
    if isinstance(store, FileStore):
        return [entry.name for entry in store.directory.iterdir() if entry.name.startswith(f".{name}.tmp.")]
    if isinstance(store, RbdStore):
        import rbd

        return [image for image in rbd.RBD().list(store._connect()) if image.startswith(f"{name}.tmp.")]
    assert isinstance(store, S3Store)
    uploads = store.client().list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
    return [upload["UploadId"] for upload in uploads if upload["Key"] == name]


# -- the contract -----------------------------------------------------------


def test_registry_builds_every_kind_from_its_own_section(tmp_path: Path) -> None:
    config = tmp_path / "diskpipe.toml"
    config.write_text('[rbd]\npool = "images"\n[s3]\nbucket = "from-config"\nendpoint = "http://127.0.0.1:1"\n')
    for kind, argument, check in (
        ("file", str(tmp_path / "d"), lambda s: s.directory == tmp_path / "d"),
        ("rbd", None, lambda s: s.config.pool == "images"),
        ("rbd", "other", lambda s: s.config.pool == "other"),
        ("s3", None, lambda s: s.bucket == "from-config"),
        ("s3", "from-cli", lambda s: s.bucket == "from-cli" and s.config.endpoint == "http://127.0.0.1:1"),
    ):
        built: Any = registry.create(kind, argument, directory=str(tmp_path / "default"), config_path=str(config))
        assert built.name == kind and check(built)
    assert registry.parse_spec("s3:images") == ("s3", "images")
    with pytest.raises(registry.UnknownStore, match="s3:BUCKET"):
        registry.parse_spec("swift:images")
    with pytest.raises(StoreError, match="invalid S3 bucket name"):
        registry.create("s3", "Bad_Bucket", directory=str(tmp_path))


def test_capabilities_not_names_decide(store: Store) -> None:
    caps = store.capabilities
    assert "raw" in caps.keeps_formats
    # qemu-img writes file and RBD images itself; S3 gets a staged file.
    assert caps.writes_directly is (store.name != "s3")
    assert ("qcow2" in caps.keeps_formats) is (store.name == "file")


def test_begin_write_finalize_read_back(store: Store) -> None:
    name = image_id()
    assert not store.exists(name)
    store_image(store, name)
    try:
        assert store.exists(name)
        location = store.location(name)
        assert location.url.startswith(URL_SCHEMES[store.name]) and name in location.url
        assert location.store == store.name
        assert read_back(store, name) == expected_bytes()
        image = store.open_image(name)
        try:
            extents = list(image.extents())
        finally:
            image.close()
        # In order, inside the image, and every written byte inside an extent
        # that holds data (holes may be listed or left out).
        assert extents == sorted(extents) and all(offset + length <= SIZE for offset, length, _ in extents)
        for offset, piece in PIECES:
            assert any(
                data and start <= offset and offset + len(piece) <= start + length for start, length, data in extents
            )
        assert temporaries(store, name) == []
        with pytest.raises(ImageExists):
            store.begin(name, SIZE)
    finally:
        store.delete(name)
    assert not store.exists(name)
    with pytest.raises(ImageNotFound):
        store.delete(name)


def test_abort_leaves_nothing(store: Store) -> None:
    name, target = half_written(store, b"partial")
    assert temporaries(store, name) != []
    store.abort(target)
    store.abort(target)  # never fails on one already gone
    assert not store.exists(name)
    assert temporaries(store, name) == []


def test_protect_refuses_delete(store: Store) -> None:
    name = image_id()
    store_image(store, name)
    try:
        assert not store.is_protected(name)
        store.protect(name)
        assert store.is_protected(name)
        with pytest.raises(ImageProtected):
            store.delete(name)
        assert store.exists(name)
        store.protect(name, False)
        assert not store.is_protected(name)
    finally:
        store.delete(name)
    with pytest.raises(ImageNotFound):
        store.protect(name)


def test_purge_temporaries_removes_a_dead_writers_leftover(store: Store) -> None:
    name, target = half_written(store, b"left behind")
    target.close()  # the writer dies without abort
    assert len(temporaries(store, name)) == 1
    removed = store.purge_temporaries(name)
    assert len(removed) == 1
    assert temporaries(store, name) == []
    assert store.purge_temporaries(name) == []
    assert not store.exists(name)


def test_purging_an_images_temporaries_leaves_those_of_an_id_it_prefixes(store: Store) -> None:
    """Image `X` and image `X.tmp` (a valid id): purging X's temporaries (done
    at the start of every delivery of X's job) must not take X.tmp's live
    one, whose name `X.tmp.tmp.<owner>` starts like X's."""
    name, target = half_written(store, b"left by X's dead writer")
    target.close()
    longer = f"{name}.tmp"
    other = store.begin(longer, SIZE)
    try:
        other.write_at(0, b"live")
        store.purge_temporaries(name)
        assert len(temporaries(store, longer)) == 1, "the temporary of the id purged as a prefix is gone"
        assert other.read_at(0, 4) == b"live"
    finally:
        store.abort(other)
        store.abort(target)
    assert temporaries(store, longer) == []


def test_begin_replaces_what_a_dead_writer_with_the_same_owner_tag_left(store: Store) -> None:
    """An earlier process with this pid died mid-write: the next begin of
    that image starts from a fresh, empty target. File and RBD temporaries
    are named by their owner, so the leftover is replaced; an S3 upload is
    one of its own, invisible, until cleanup or a purge aborts it."""
    name, target = half_written(store, b"left by the dead one")
    target.close()
    again = store.begin(name, SIZE)
    try:
        again.write_at(SIZE - 8, b"new one!")
        assert again.read_at(0, 64) == bytes(64), "the dead writer's data is still there"
    finally:
        store.abort(again)
    if not isinstance(store, S3Store):
        assert temporaries(store, name) == []
    store.purge_temporaries(name)
    assert temporaries(store, name) == []


class _RbdStoreHeldAtCreate(RbdStore):
    """An RBD store whose cluster stops answering (the OSD held still,
    SIGSTOP) right after begin's existence check: its create of the
    temporary is in flight, and ends only when the OSD continues."""

    def __init__(self, config: RbdConfig, osd: int) -> None:
        super().__init__(config)
        self.osd = osd
        self.creating = threading.Event()

    def exists(self, image_id: str) -> bool:
        found = super().exists(image_id)
        if not self.creating.is_set():
            os.kill(self.osd, signal.SIGSTOP)
            self.creating.set()
        return found


# How a stop reaches a job: Ctrl-C (SIGTERM takes the same path,
# diskpipe.interrupts), or a Celery worker's soft time limit (billiard's pool
# sends the worker SIGUSR1; its handler raises SoftTimeLimitExceeded, an
# ordinary Exception).
STOPS = {
    "interrupt": (signal.SIGINT, signal.default_int_handler, KeyboardInterrupt),
    "time-limit": (signal.SIGUSR1, soft_timeout_sighandler, SoftTimeLimitExceeded),
}


@pytest.mark.timeout(FAULT_TEST_TIMEOUT)
@pytest.mark.parametrize("stop", sorted(STOPS))
def test_rbd_begin_interrupted_while_it_creates_the_temporary_leaves_nothing(ceph_recovers: Any, stop: str) -> None:
    """Ctrl-C, SIGTERM or a time limit while librbd creates the temporary:
    the stop is raised when the create has finished, before begin hands back
    a target anyone would abort. begin removes the image itself."""
    ceph = ceph_recovers
    (osd,) = ceph.pids("osd")
    store = _RbdStoreHeldAtCreate(RbdConfig(conf=ceph.conf, connect_timeout=10, op_timeout=120), osd)
    main = threading.main_thread().ident
    assert main is not None and threading.get_ident() == main
    name = image_id()
    signum, handler, raised = STOPS[stop]
    previous = signal.signal(signum, handler)

    def interrupt() -> None:
        store.creating.wait(RECOVERY_TIMEOUT)
        time.sleep(1)  # the create is sent (microseconds after the check) and waits for the OSD
        signal.pthread_kill(main, signum)
        os.kill(osd, signal.SIGCONT)

    interrupter = threading.Thread(target=interrupt, daemon=True)
    interrupter.start()
    try:
        with pytest.raises(raised):
            store.begin(name, SIZE)
    finally:
        interrupter.join(RECOVERY_TIMEOUT)
        os.kill(osd, signal.SIGCONT)
        signal.signal(signum, previous)
    try:
        assert [found for found in ceph.rbd("ls").split() if found.startswith(name)] == []
    finally:
        store.purge_temporaries(name)
        store.close()


def test_cleanup_asks_is_live_first(store: Store) -> None:
    name, target = half_written(store, b"abandoned")
    target.close()
    kept = store.cleanup(lambda image, owner: True if image == name else None)
    assert not any(name in entry.name for entry in kept)
    assert len(temporaries(store, name)) == 1, "a live writer's temporary was removed"
    removed = store.cleanup(lambda image, owner: False if image == name else None)
    assert any(name in entry.name and entry.removed for entry in removed)
    assert temporaries(store, name) == []


def make_qcow2(path: Path) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "24M"], check=True)
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x5a 1M 3M", "-c", "write -P 0xa5 11M 2M", "-c", "write -P 0x01 23M 1M", str(path)],
        check=True,
        capture_output=True,
    )
    return path


def test_a_real_conversion_reads_back_byte_identical(store: Store, tmp_path: Path) -> None:
    source = make_qcow2(tmp_path / "small.qcow2")
    raw = tmp_path / "reference.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(source), str(raw)], check=True)
    reference = raw.read_bytes()
    name = image_id()
    result = convert_image(ConvertRequest(source=str(source), image_id=name), store)
    try:
        assert read_back(store, name) == reference
        assert result.checksums.md5 == hashlib.md5(reference).hexdigest()
        assert result.checksums.sha512 == hashlib.sha512(reference).hexdigest()
        assert result.location.url == store.location(name).url
        assert temporaries(store, name) == []
    finally:
        store.delete(name)
    if "qcow2" not in store.capabilities.keeps_formats:
        with pytest.raises(ValueError, match="keeps raw only"):
            convert_image(ConvertRequest(source=str(source), image_id=name, to_format="qcow2"), store)


# -- S3 faults ----------------------------------------------------------------


def test_s3_location_names_the_object_and_glance_form(rgw: Any, staging: Path) -> None:
    bucket = rgw.bucket()
    store = S3Store(s3_config(rgw, bucket, staging, prefix="images/"))
    name = image_id()
    store_image(store, name)
    location = store.location(name)
    assert location.url == f"s3://{bucket}/images/{name}"
    assert location.metadata["glance_location"] == f"s3+{rgw.endpoint}/{bucket}/images/{name}"
    head = rgw.client().head_object(Bucket=bucket, Key=f"images/{name}")
    assert head["ContentLength"] == SIZE
    store.delete(name)


def test_s3_gateway_stopped_mid_upload(rgw: Any, staging: Path, tmp_path: Path) -> None:
    bucket = rgw.bucket()
    store = S3Store(s3_config(rgw, bucket, staging))
    source = make_qcow2(tmp_path / "small.qcow2")
    name = image_id()
    stopped = []

    def progress(stage: str, percent: float) -> None:
        # The parts go up beside the hashing: stop the gateway just before.
        if stage == "checksum" and not stopped:
            rgw.stop()
            stopped.append(stage)

    try:
        with pytest.raises(StoreUnavailable, match="unreachable"):
            convert_image(ConvertRequest(source=str(source), image_id=name), store, progress=progress)
        assert stopped
    finally:
        rgw.start()
    # The object never became visible; the unfinished upload (abort could not
    # reach the gateway) is invisible, and cleanup aborts it.
    assert not store.exists(name)
    assert "Contents" not in rgw.client().list_objects_v2(Bucket=bucket)
    assert len(temporaries(store, name)) == 1
    assert store.cleanup() == [], "a fresh upload is not stale yet"
    stale = S3Store(s3_config(rgw, bucket, staging, stale_after=0))
    (aborted,) = stale.cleanup()
    assert aborted.removed and name in aborted.name
    assert temporaries(store, name) == []


def counting_parts(store: S3Store, monkeypatch: pytest.MonkeyPatch, after_each: Any = None) -> list[str]:
    """The parts the store sends, as they are answered (the real calls)."""
    sent: list[str] = []
    call = store._call

    def counted(what: str, function: Any, **kwargs: Any) -> Any:
        answer = call(what, function, **kwargs)
        if what.startswith("upload part"):
            sent.append(what)
            if after_each is not None:
                after_each()
        return answer

    monkeypatch.setattr(store, "_call", counted)
    return sent


def test_s3_seal_sends_no_part_after_it_is_cancelled(rgw: Any, staging: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = rgw.bucket()
    store = S3Store(s3_config(rgw, bucket, staging, threads=1))
    name, target = half_written(store, os.urandom(SIZE))  # three 5 MiB parts
    stop = CancelToken()
    sent = counting_parts(store, monkeypatch, after_each=stop.cancel)
    try:
        with pytest.raises(Cancelled):
            store.seal(target, stop)
        assert sent == [f"upload part 1/3 of {name}"]
        listed = rgw.client().list_parts(Bucket=bucket, Key=target.key, UploadId=target.upload_id)
        assert [part["PartNumber"] for part in listed["Parts"]] == [1]
    finally:
        store.abort(target)
    assert temporaries(store, name) == []


def test_a_time_limit_while_s3_parts_go_up_stops_the_upload_at_the_next_part(
    rgw: Any, staging: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The staged file is hashed while its parts go up (the upload does not
    change what is hashed), and a worker's time limit landing then stops the
    upload instead of waiting for every part."""
    store = S3Store(s3_config(rgw, rgw.bucket(), staging, threads=1))
    source = make_qcow2(tmp_path / "small.qcow2")  # 24 MiB: five parts
    name = image_id()
    first_part = threading.Event()
    sent = counting_parts(store, monkeypatch, after_each=first_part.set)

    def progress(stage: str, percent: float) -> None:
        if stage == "checksum":
            assert first_part.wait(120), "no part went up while the image was hashed"
            raise SoftTimeLimitExceeded()

    with pytest.raises(SoftTimeLimitExceeded):
        convert_image(ConvertRequest(source=str(source), image_id=name), store, progress=progress)
    assert 1 <= len(sent) < 5, sent
    assert not store.exists(name)
    assert temporaries(store, name) == []


def test_s3_wrong_credentials_is_a_setup_error(rgw: Any, staging: Path, tmp_path: Path) -> None:
    bucket = rgw.bucket()
    store = S3Store(s3_config(rgw, bucket, staging, secret_key="not-the-secret"))
    with pytest.raises(StoreError, match="refused the credentials") as raised:
        convert_image(ConvertRequest(source=str(make_qcow2(tmp_path / "s.qcow2")), image_id=image_id()), store)
    assert not isinstance(raised.value, StoreUnavailable)
    assert "Contents" not in rgw.client().list_objects_v2(Bucket=bucket)
    assert rgw.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_s3_missing_bucket_is_a_setup_error(rgw: Any, staging: Path, tmp_path: Path) -> None:
    store = S3Store(s3_config(rgw, f"missing-{uuid.uuid4().hex[:8]}", staging))
    with pytest.raises(StoreError, match="does not exist") as raised:
        convert_image(ConvertRequest(source=str(make_qcow2(tmp_path / "s.qcow2")), image_id=image_id()), store)
    assert not isinstance(raised.value, StoreUnavailable)


def test_s3_unreachable_endpoint_is_transient(staging: Path) -> None:
    store = S3Store(
        S3Config(bucket="any", endpoint="http://127.0.0.1:9", access_key="k", secret_key="s", max_attempts=1)
    )
    with pytest.raises(StoreUnavailable, match="unreachable"):
        store.begin(image_id(), SIZE)


def test_cli_converts_and_imports_into_s3_and_exits_2_on_wrong_credentials(rgw: Any, tmp_path: Path) -> None:
    bucket = rgw.bucket()
    source = make_qcow2(tmp_path / "cli.qcow2")
    env = dict(
        os.environ,
        XDG_DATA_HOME=str(tmp_path / "data"),
        DISKPIPE_S3_ENDPOINT=rgw.endpoint,
        DISKPIPE_S3_ACCESS_KEY=rgw.access_key,
        DISKPIPE_S3_SECRET_KEY=rgw.secret_key,
        DISKPIPE_S3_ADDRESSING="path",
        DISKPIPE_S3_STAGING_DIR=str(tmp_path),
    )
    env.pop("DISKPIPE_CONFIG", None)
    env.pop("DISKPIPE_BROKER_URL", None)
    store_option = ["--store", f"s3:{bucket}"]

    def diskpipe(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "diskpipe", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )

    command = ["convert", str(source), *store_option, "--quiet"]
    done = diskpipe(*command, "--id", "cli-ok")
    assert done.returncode == 0, done.stderr
    assert f"s3://{bucket}/cli-ok" in done.stdout
    # The whole in-process pipeline (purge, convert, verify, record, delete).
    imported = diskpipe("import", "./cli.qcow2", *store_option, "--id", "cli-import", "--output=json")
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert '"status": "active"' in imported.stdout and f"s3://{bucket}/cli-import" in imported.stdout
    deleted = diskpipe("delete", "cli-import", *store_option)
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    keys = [item["Key"] for item in rgw.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys == ["cli-ok"]
    cleaned = diskpipe("cleanup", *store_option, "--output=json")
    assert cleaned.returncode == 0, cleaned.stderr
    assert '"store": []' in cleaned.stdout
    env["DISKPIPE_S3_SECRET_KEY"] = "wrong"
    failed = diskpipe(*command, "--id", "cli-bad")
    assert failed.returncode == 2
    assert "refused the credentials" in failed.stderr


def test_an_s3_part_is_streamed_from_the_staged_file_not_held_in_memory(tmp_path: Path) -> None:
    """A part is read piece by piece (at most PIECE bytes a read), whatever
    its size; a part in a hole never touches the file."""
    import hashlib
    import io

    from diskpipe.converter.stores.s3 import PIECE, PartBody

    data = os.urandom(3 * PIECE + 123)
    staged = tmp_path / "staged"
    staged.write_bytes(bytes(PIECE) + data)
    fd = os.open(staged, os.O_RDONLY)
    try:
        part = PartBody(fd, PIECE, len(data), zeros=False)
        assert part.md5() == hashlib.md5(data).digest()
        reads = []
        while chunk := part.read(1 << 30):
            reads.append(len(chunk))
        assert max(reads) == PIECE and sum(reads) == len(data)
        part.seek(0)
        assert part.read() == data
    finally:
        os.close(fd)
    hole = PartBody(-1, 0, 5 * PIECE, zeros=True)  # no descriptor at all
    assert hole.md5() == hashlib.md5(bytes(5 * PIECE)).digest()
    assert hole.seek(0, io.SEEK_END) == 5 * PIECE


def test_rbd_extents_come_from_the_object_map_whole_objects(ceph: Any) -> None:
    """The data extents of a sealed RBD image are whole 4 MiB objects from
    the object map: a listing per object would cost a round per object of
    the virtual size (an empty TiB has 262,144). Reading whole objects reads
    their zeros too; the digests over them are those of the exact bytes."""
    store = RbdStore(RbdConfig(conf=ceph.conf, connect_timeout=10, op_timeout=20))
    name = image_id()
    target = store.begin(name, SIZE)
    try:
        for offset, piece in PIECES:
            target.write_at(offset, piece)
        store.seal(target)
        extents = [extent for extent in target.extents() if extent[2]]
        objects = sorted(
            {offset >> 22 for offset, piece in PIECES} | {(offset + len(piece) - 1) >> 22 for offset, piece in PIECES}
        )
        assert extents == [(number << 22, min(4 * MiB, SIZE - (number << 22)), True) for number in objects]
        sums = hash_image(SIZE, target.extents(), target.read_at, full=True, sparse=True)
        expected = expected_bytes()
        assert (sums.md5, sums.sha512) == (hashlib.md5(expected).hexdigest(), hashlib.sha512(expected).hexdigest())
    finally:
        store.abort(target)
        store.close()
