"""No job is ever wedged: an unexpected exception at any step of an import
ends the record `killed` with a reason naming the step, and leaves no staged
file, no temporary and no image behind; a record left `saving` whose lease is
gone is taken over by the next submission of its id.

An unexpected exception (a bug) cannot be caused for real, so these tests
inject one with monkeypatch at each step, the only mock here; the records,
the file store, qemu-img, the HTTP server and Redis are real.
"""

from __future__ import annotations

import gzip
import http.server
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from diskpipe.converter import convert
from diskpipe.converter.stores.file import FileStore
from diskpipe.jobs import pipeline, sources, unpacking
from diskpipe.jobs.admission import ensure_record
from diskpipe.jobs.pipeline import Environment, ImportJob, run_import
from diskpipe.jobs.records import SqliteRecords
from samples import tools
from tests.conftest import RECOVERY_TIMEOUT, ROOT
from tests.workers import start_worker


class Injected(Exception):
    """Stands for a bug; never caught by name anywhere in diskpipe."""


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qcow2 with data, and the same gzip-compressed."""
    base = tmp_path_factory.mktemp("images")
    path = base / "disk.qcow2"
    tools.create(path, "qcow2", 16 << 20)
    tools.write(path, "qcow2", [(0, 2 << 20, 0x5A), (8 << 20, 1 << 20, 0x3C)])
    (base / "disk.qcow2.gz").write_bytes(gzip.compress(path.read_bytes()))
    return base


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def web(images: Path) -> Iterator[str]:
    handler = lambda *args: _Quiet(*args, directory=str(images))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def environment(tmp_path: Path, images: Path, web: str, records: Any = None) -> Environment:
    return Environment(
        records=records or SqliteRecords(str(tmp_path / "records.sqlite")),
        store=FileStore(tmp_path / "store"),
        import_config=sources.ImportConfig(
            allowed_dirs=(str(images),),
            staging_dir=str(tmp_path / "staging"),
            allowed_ports=(int(web.rsplit(":", 1)[1]),),
            allowed_networks=("127.0.0.1/32",),
        ),
    )


def left_behind(tmp_path: Path) -> list[str]:
    """Staged files, store temporaries and images: after a killed job, none."""
    found = []
    for directory in (tmp_path / "staging", tmp_path / "store"):
        if directory.is_dir():
            found += [f"{directory.name}/{entry.name}" for entry in directory.iterdir()]
    return found


def raising(error: Exception, original: Callable[..., Any] | None = None, on_call: int = 1) -> Callable[..., Any]:
    """A stand-in that raises `error` on its `on_call`-th call (the earlier
    calls go to `original`)."""
    calls = [0]

    def stand_in(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == on_call or original is None:
            raise error
        return original(*args, **kwargs)

    return stand_in


def failing_transition(error: Exception, wanted: str) -> Callable[..., Any]:
    original = SqliteRecords.transition

    def transition(self: SqliteRecords, image_id: str, expected: str, new: str, **changes: Any) -> dict[str, Any]:
        if new == wanted:
            raise error
        return original(self, image_id, expected, new, **changes)

    return transition


# (step named in the reason, source, where the bug is injected)
FAULTS: list[tuple[str, str, Callable[[pytest.MonkeyPatch, Exception], None]]] = [
    ("record", "qcow2", lambda mp, error: mp.setattr(SqliteRecords, "transition", failing_transition(error, "saving"))),
    ("purge", "qcow2", lambda mp, error: mp.setattr(FileStore, "purge_temporaries", raising(error))),
    ("fetch", "qcow2", lambda mp, error: mp.setattr(sources, "open_local", raising(error))),
    # mid-download: the staged file exists already
    ("fetch", "url", lambda mp, error: mp.setattr(sources.SparseWriter, "write", raising(error))),
    # mid-decompression: the unpacked file exists already
    ("unpack", "gz", lambda mp, error: mp.setattr(unpacking.CappedSparseWriter, "finish", raising(error))),
    # inspecting the unpacked layer: the unpacked file exists, only unpack knows it
    ("unpack", "gz", lambda mp, error: mp.setattr(unpacking, "inspect", raising(error, unpacking.inspect, on_call=2))),
    ("convert", "qcow2", lambda mp, error: mp.setattr(pipeline, "convert_image", raising(error))),
    # after qemu-img wrote the temporary image
    ("convert", "url", lambda mp, error: mp.setattr(convert, "hash_image", raising(error))),
    # the image is stored under its final name
    ("verify", "qcow2", lambda mp, error: mp.setattr(pipeline, "verify", raising(error))),
    ("record", "gz", lambda mp, error: mp.setattr(SqliteRecords, "transition", failing_transition(error, "active"))),
]


def source_of(kind: str, images: Path, web: str) -> str:
    return {"qcow2": str(images / "disk.qcow2"), "gz": str(images / "disk.qcow2.gz"), "url": f"{web}/disk.qcow2"}[kind]


@pytest.mark.parametrize("error_type", [RuntimeError, KeyError])
@pytest.mark.parametrize(
    ("step", "kind", "inject"), FAULTS, ids=[f"{step}-{kind}-{index}" for index, (step, kind, _) in enumerate(FAULTS)]
)
def test_an_unexpected_error_at_any_step_ends_the_record_killed_and_leaves_nothing(
    step: str,
    kind: str,
    inject: Callable[[pytest.MonkeyPatch, Exception], None],
    error_type: type[Exception],
    images: Path,
    web: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = environment(tmp_path, images, web)
    job = ImportJob("img-1", source_of(kind, images, web), claimed_format="qcow2")
    with monkeypatch.context() as patch:
        inject(patch, error_type("injected bug"))
        record = run_import(job, env, "attempt-1")
    assert record["status"] == "killed", record
    assert record["reason"].startswith(f"internal error during {step}: {error_type.__name__}"), record["reason"]
    assert "injected bug" in record["reason"]
    assert env.records.get("img-1")["status"] == "killed"
    assert left_behind(tmp_path) == []
    # Nothing wedged: the same id, submitted again, now goes through.
    again = run_import(job, env, "attempt-2")
    assert again["status"] == "active", again.get("reason")


def test_a_malformed_image_inside_gzip_is_refused_and_leaves_no_unpacked_file(
    images: Path, web: str, tmp_path: Path
) -> None:
    # No mock: a VHDX signature with no valid header, compressed.
    packed = tmp_path / "broken.vhdx.gz"
    packed.write_bytes(gzip.compress(b"vhdxfile" + bytes(320 * 1024)))
    env = environment(tmp_path, images, web)
    env.import_config = sources.ImportConfig(allowed_dirs=(str(tmp_path),), staging_dir=str(tmp_path / "staging"))
    record = run_import(ImportJob("broken", str(packed)), env, "attempt-1")
    assert record["status"] == "killed" and "malformed" in record["reason"], record
    assert left_behind(tmp_path) == []


def test_a_bug_that_even_the_kill_cannot_record_escapes_and_the_next_submission_takes_over(
    images: Path, web: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = environment(tmp_path, images, web)
    job = ImportJob("img-2", str(images / "disk.qcow2.gz"), claimed_format="qcow2")
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "verify", raising(RuntimeError("injected bug")))
        patch.setattr(SqliteRecords, "transition", failing_transition(OSError("records unwritable"), "killed"))
        with pytest.raises(RuntimeError, match="injected bug"):
            run_import(job, env, "attempt-1")
    assert env.records.get("img-2")["status"] == "saving"  # no lease holds it in this process
    assert left_behind(tmp_path) == []
    record = run_import(job, env, "attempt-2")
    assert record["status"] == "active" and record["task_id"] == "attempt-2"


# -- with Redis: records, leases, takeover -------------------------------------


def test_a_saving_record_whose_lease_is_gone_is_taken_over_by_a_resubmission(
    redis_url: str, images: Path, web: str, tmp_path: Path
) -> None:
    from diskpipe.jobs.connection import redis_client
    from diskpipe.jobs.lease import Lease
    from diskpipe.jobs.records import RedisRecords, new_record

    client = redis_client(redis_url)
    records = RedisRecords(client)
    image_id = f"takeover-{tmp_path.name}"
    job = ImportJob(image_id, str(images / "disk.qcow2"), claimed_format="qcow2")
    # A worker took the job and died: the record says saving, no lease is left.
    records.create(new_record(image_id, source=job.source, task_id="dead-attempt"))
    records.transition(image_id, "queued", "saving", task_id="dead-attempt", owner="dead-worker")

    def lease_gone() -> bool:
        return not Lease(client, image_id, "cli").held_by_anyone()

    # While a live delivery holds the lease, a resubmission leaves it alone.
    live = Lease(client, image_id, "live-worker", ttl=30)
    assert live.try_acquire()
    assert ensure_record(records, job, "resubmitted", lease_gone)["task_id"] == "dead-attempt"
    live.release()
    # With the lease gone it takes the record over (so the CLI sends the job).
    taken = ensure_record(records, job, "resubmitted", lease_gone)
    assert taken["status"] == "saving" and taken["task_id"] == "resubmitted"
    env = environment(tmp_path, images, web, records=records)
    # A TTL a late heartbeat on a busy machine cannot outlast: nobody else wants the lease.
    env.lease = lambda name: Lease(client, name, "test-worker", ttl=RECOVERY_TIMEOUT)
    record = run_import(job, env, "resubmitted")
    assert record["status"] == "active", record.get("reason")
    assert not Lease(client, image_id, "cli").held_by_anyone()


# -- through a real Celery worker ------------------------------------------------

SOFT_TIME_LIMIT = 25  # seconds; every job here takes a few
CELERY_WORKER = [sys.executable, "-m", "celery", "-A", "tests.fault_worker", "worker", "-c", "1", "-l", "info"]
CELERY_WORKER += ["--without-mingle", "--without-gossip"]


@pytest.fixture(scope="module")
def fault_worker(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, images: Path
) -> Iterator[tuple[dict[str, str], Path, Path]]:
    """A Celery worker (`tests.fault_worker`) over the test Redis, with the file
    store; yields (its environment, the fault file, its base directory)."""
    base = tmp_path_factory.mktemp("fault-worker")
    config = base / "diskpipe.toml"
    config.write_text(
        f"""
[store]
kind = "file"
directory = "{base / "store"}"
[import]
allowed_dirs = ["{images}"]
staging_dir = "{base / "staging"}"
[celery]
queue = "diskpipe-faults"
visibility_timeout = 60
soft_time_limit = {SOFT_TIME_LIMIT}
time_limit = {SOFT_TIME_LIMIT * 2}
lease_ttl = 6
max_retries = 1
retry_backoff_max = 1
"""
    )
    fault_file = base / "fault"
    env = dict(
        os.environ,
        DISKPIPE_CONFIG=str(config),
        DISKPIPE_BROKER_URL=redis_url,
        DISKPIPE_TEST_FAULT_FILE=str(fault_file),
        PYTHONUNBUFFERED="1",
    )
    worker = start_worker(CELERY_WORKER, env, base / "worker.log", f"faults-{os.getpid()}", redis_url)
    try:
        yield env, fault_file, base
    finally:
        worker.stop()


def cli(env: dict[str, str], *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diskpipe", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def worker_left_behind(base: Path) -> list[str]:
    return left_behind(base)


@pytest.mark.parametrize("step", ["fetch", "unpack", "convert", "verify"])
def test_a_bug_in_a_worker_ends_the_record_killed_naming_the_step(
    step: str, fault_worker: tuple[dict[str, str], Path, Path], images: Path
) -> None:
    env, fault_file, base = fault_worker
    fault_file.write_text(step)
    image_id = f"fault-{step}-{uuid.uuid4().hex[:6]}"
    done = cli(env, "import", str(images / "disk.qcow2.gz"), "--id", image_id, "--output=json")
    record = json.loads(done.stdout)
    # A bug is no verdict on the image: exit 2, not 1.
    assert done.returncode == 2 and record["status"] == "killed", (done.stdout, done.stderr)
    assert record["reason"] == f"internal error during {step}: RuntimeError: injected bug at {step}"
    assert worker_left_behind(base) == []


def test_a_record_left_saving_by_a_failed_worker_is_taken_over_by_resubmitting(
    fault_worker: tuple[dict[str, str], Path, Path], redis_url: str, images: Path
) -> None:
    from celery import Celery

    from diskpipe.jobs.connection import redis_client
    from diskpipe.jobs.lease import Lease
    from diskpipe.jobs.records import RedisRecords

    env, fault_file, base = fault_worker
    client = redis_client(redis_url)
    records = RedisRecords(client)
    fault_file.write_text("verify+escape")
    image_id = f"wedged-{uuid.uuid4().hex[:6]}"
    submitted = cli(env, "import", str(images / "disk.qcow2"), "--id", image_id, "--no-wait")
    assert submitted.returncode == 0, submitted.stderr
    # The job fails in a way even its record cannot tell: its task fails, the
    # record stays saving, and the worker has let go of the lease.
    first = records.get(image_id)
    assert first is not None
    result = Celery(broker=redis_url, backend=redis_url).AsyncResult(first["task_id"])
    result.get(timeout=120, propagate=False)
    assert result.state == "FAILURE"
    assert records.get(image_id)["status"] == "saving"
    assert not Lease(client, image_id, "test").held_by_anyone()
    fault_file.write_text("")
    again = cli(env, "import", str(images / "disk.qcow2"), "--id", image_id, "--output=json", timeout=120)
    record = json.loads(again.stdout)
    assert again.returncode == 0 and record["status"] == "active", (again.stdout, again.stderr)
    assert record["attempts"] == 2
    assert worker_left_behind(base) == [f"store/{image_id}.raw"]


def test_a_time_limit_while_waiting_for_a_live_lease_kills_no_record(
    fault_worker: tuple[dict[str, str], Path, Path], redis_url: str, images: Path
) -> None:
    from celery import Celery

    from diskpipe.jobs.connection import redis_client
    from diskpipe.jobs.lease import Lease
    from diskpipe.jobs.records import RedisRecords, new_record

    _, fault_file, _ = fault_worker
    fault_file.write_text("")
    client = redis_client(redis_url)
    records = RedisRecords(client)
    image_id = f"busy-{uuid.uuid4().hex[:6]}"
    source = str(images / "disk.qcow2")
    # Another delivery is working on the image and holds its lease.
    records.create(new_record(image_id, source=source, task_id="live-attempt"))
    records.transition(image_id, "queued", "saving", task_id="live-attempt", owner="live-worker")
    # Its TTL outlasts the test: a heartbeat late on a busy machine must not
    # hand the lease to the delivery that is to wait for it.
    live = Lease(client, image_id, "live-worker", ttl=RECOVERY_TIMEOUT)
    assert live.try_acquire()
    live.start_heartbeat()
    try:
        # A second delivery waits for that lease until its soft time limit.
        result = Celery(broker=redis_url, backend=redis_url).send_task(
            "diskpipe.import_image", kwargs={"image_id": image_id, "source": source}, queue="diskpipe-faults"
        )
        result.get(timeout=SOFT_TIME_LIMIT + 120, propagate=False)  # the limit, then a busy worker ending the task
        record = records.get(image_id)
        assert record is not None and record["status"] == "saving" and record["task_id"] == "live-attempt", record
    finally:
        live.release()
