"""The Celery pipeline with real parts: Redis (append-only), worker processes
started with `celery -A diskpipe.tasks worker`, and a one-node Ceph.

Jobs go from submission to `active`; hostile images end `killed`; killed
workers, a restarted Redis and a paused Ceph lose no job, run none twice and
leave no half image; 50 jobs at once all end active.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from diskpipe.jobs.connection import redis_client
from diskpipe.jobs.records import RedisRecords
from samples import tools
from tests.conftest import (
    FAULT_TEST_TIMEOUT,
    RECOVERY_TIMEOUT,
    Ceph,
    ensure_redis,
    redis_config_file,
    restart_redis,
    wait_until,
)
from tests.workers import Worker, start_worker, write_config

# Every test here waits for jobs with RECOVERY_TIMEOUT deadlines, some for
# several in a row: the hang guard must sit above them.
pytestmark = pytest.mark.timeout(FAULT_TEST_TIMEOUT)

FINAL = ("active", "killed", "deleted")
VISIBILITY_TIMEOUT = 12  # seconds (Redis' default is an hour; the tests wait it out)
CELERY_WORKER = [
    sys.executable,
    "-m",
    "celery",
    "-A",
    "diskpipe.tasks",
    "worker",
    "-l",
    "info",
    "--without-mingle",
    "--without-gossip",
]


class Workers:
    """Celery worker processes sharing one configuration."""

    def __init__(self, config: Path, broker: str, logs: Path) -> None:
        self.config = config
        self.broker = broker
        self.logs = logs
        self.running: dict[str, Worker] = {}

    @property
    def processes(self) -> dict[str, subprocess.Popen[bytes]]:
        return {name: worker.process for name, worker in self.running.items()}

    def env(self) -> dict[str, str]:
        return dict(os.environ, DISKPIPE_CONFIG=str(self.config), DISKPIPE_BROKER_URL=self.broker, PYTHONUNBUFFERED="1")

    def start(self, name: str, concurrency: int = 2) -> None:
        command = [*CELERY_WORKER, "-c", str(concurrency)]
        self.running[name] = start_worker(command, self.env(), self.logs / f"{name}.log", name, self.broker)

    def ensure_running(self, names: dict[str, int], restart: bool) -> None:
        """Every named worker (name -> concurrency) runs and answers; all are
        restarted when `restart` (e.g. the cluster they cache was rebuilt)."""
        for name, concurrency in names.items():
            worker = self.running.get(name)
            if worker is not None and (restart or worker.process.poll() is not None):
                self.kill(name)
                worker = None
            if worker is None:
                self.start(name, concurrency)

    def kill(self, name: str) -> None:
        self.running.pop(name).kill()

    def stop_all(self) -> None:
        for name in list(self.running):
            self.running.pop(name).stop()


@pytest.fixture(scope="module")
def imports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("imports")


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory, redis_url: str, ceph: Ceph, imports: Path) -> Iterator[Workers]:
    base = tmp_path_factory.mktemp("workers")
    config = write_config(
        base / "diskpipe.toml",
        {
            "store": {"kind": "rbd"},
            "rbd": {"conf": ceph.conf, "connect_timeout": 5, "op_timeout": 6},
            "import": {"allowed_dirs": [str(imports)], "staging_dir": str(base / "staging")},
            "celery": {
                "visibility_timeout": VISIBILITY_TIMEOUT,
                "lease_ttl": 6,
                "max_retries": 2,
                "retry_backoff_max": 2,
            },
        },
    )
    pool = Workers(config, redis_url, base)
    pool.start("w1")
    yield pool
    pool.stop_all()


@pytest.fixture
def recovers(workers: Workers, redis_url: str, ceph: Ceph) -> Iterator[None]:
    """For fault tests: whatever the test did or where it failed, the next
    test gets Redis answering, a Ceph serving I/O (rebuilt if it does not come
    back in time) and worker w1 consuming."""
    redis_conf = redis_config_file(redis_url)
    yield
    ensure_redis(redis_url, redis_conf)
    generation = ceph.generation
    ceph.ensure_healthy()
    workers.ensure_running({"w1": 2}, restart=ceph.generation != generation)


@pytest.fixture
def records(redis_url: str) -> RedisRecords:
    return RedisRecords(redis_client(redis_url))


def submit(broker: str, source: str, image_id: str | None = None, **kwargs: Any) -> str:
    image_id = image_id or f"img-{uuid.uuid4().hex[:10]}"
    send_import(broker, source, image_id, **kwargs)
    return image_id


def send_import(broker: str, source: str, image_id: str, **kwargs: Any) -> str:
    """Queue an import of `source` as `image_id`; the Celery task's id."""
    from celery import Celery

    client = Celery(broker=broker)
    sent = client.send_task(
        "diskpipe.import_image", kwargs={"image_id": image_id, "source": source, **kwargs}, queue="diskpipe"
    )
    return str(sent.id)


def wait_task_ended(workers: Workers, task: str) -> None:
    """Wait until a worker's log says the Celery task `task` ended (however)."""
    ended = re.compile(rf"Task diskpipe\.import_image\[{re.escape(task)}\] (succeeded|retry|raised|failed)")
    wait_until(
        lambda: (
            None
            if any(ended.search(log.read_text(errors="replace")) for log in workers.logs.glob("*.log"))
            else "not in any worker log"
        ),
        f"task {task} ending",
        interval=0.2,
    )


def wait_final(records: RedisRecords, image_id: str, timeout: float = RECOVERY_TIMEOUT) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = records.get(image_id)
        if record is not None and record["status"] in FINAL:
            return record
        time.sleep(0.2)
    raise AssertionError(f"{image_id} did not finish: {records.get(image_id)} {records.get_progress(image_id)}")


def wait_stage(
    records: RedisRecords, image_id: str, stages: tuple[str, ...], timeout: float = RECOVERY_TIMEOUT
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = records.get_progress(image_id)
        record = records.get(image_id)
        if progress and progress["stage"] in stages and record and record["status"] == "saving":
            return record
        time.sleep(0.05)
    raise AssertionError(f"{image_id} never reached {stages}: {records.get(image_id)}")


def stage(imports: Path, source: Path, name: str | None = None) -> str:
    target = imports / (name or source.name)
    subprocess.run(["cp", "--sparse=always", str(source), str(target)], check=True)
    return str(target)


# A sample's name, the name to stage it under -> its path in the import directory
StageSample = Callable[[str, str], str]


@pytest.fixture
def stage_sample(imports: Path, samples_dir: Path, manifest: list[Any]) -> StageSample:
    def stage_named(sample: str, name: str) -> str:
        entry = next(entry for entry in manifest if entry.name == sample)
        return stage(imports, samples_dir / entry.file, name)

    return stage_named


def reference_md5(path: Path, fmt: str, tmp_path: Path) -> str:
    out = tmp_path / f"ref-{uuid.uuid4().hex[:6]}.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(out)], check=True)
    with out.open("rb") as handle:  # in pieces: a long source is a GiB of raw
        digest = hashlib.file_digest(handle, "md5").hexdigest()
    out.unlink()
    return digest


def rbd_names(ceph: Ceph) -> list[str]:
    return ceph.rbd("ls").split()


def long_source(tmp_path: Path, imports: Path, name: str) -> str:
    """A job that takes seconds: 1 GiB to hash (~3 s of CPU on a quiet
    machine, longer on a busy one), some data to convert. Long enough for a
    test to act while it runs (it polls the job's stage every 0.05 s); every
    GiB more costs each test that runs it to the end ~3 s per run, and the
    reference checksum as much again."""
    path = tmp_path / f"{name}.qcow2"
    tools.create(path, "qcow2", 1 << 30)
    tools.write(path, "qcow2", [(0, 32 << 20, 0x3C), (768 << 20, 16 << 20, 0x5A)])
    return stage(imports, path)


SOURCES = [
    ("qcow2-data-offsets", "qcow2"),
    ("vmdk-stream-data", "vmdk"),
    ("vhd-dynamic", "vpc"),
    ("vhd-fixed-vbox", "vpc"),
    ("vhdx-dynamic", "vhdx"),
    ("vdi-dynamic", "vdi"),
    ("qed-default", "qed"),
    ("parallels-data", "parallels"),
    ("raw-1m-random", "raw"),
]


def test_every_source_format_reaches_active(
    workers: Workers, records: RedisRecords, redis_url: str, ceph: Ceph, imports: Path, samples_dir: Path,
    manifest: list[Any], tmp_path: Path,
) -> None:  # fmt: skip
    submitted = {}
    for name, fmt in SOURCES:
        entry = next(entry for entry in manifest if entry.name == name)
        source = stage(imports, samples_dir / entry.file)
        submitted[submit(redis_url, source)] = (entry, fmt)
    for image_id, (entry, fmt) in submitted.items():
        record = wait_final(records, image_id)
        assert record["status"] == "active", record
        assert record["disk_format"] == "raw" and record["container_format"] == "bare"
        assert record["locations"][0]["url"].endswith(f"/rbd/{image_id}/snap")
        assert record["os_hash_algo"] == "sha512" and len(record["os_hash_value"]) == 128
        if fmt != "vpc":
            assert record["checksum"] == reference_md5(samples_dir / entry.file, fmt, tmp_path)
        assert record["attempts"] == 1
    assert not [name for name in rbd_names(ceph) if ".tmp." in name]


def test_hostile_and_forbidden_sources_end_killed_with_nothing_stored(
    workers: Workers, records: RedisRecords, redis_url: str, ceph: Ceph, stage_sample: StageSample
) -> None:
    refused = submit(redis_url, stage_sample("hostile-qcow2-backing-passwd", "backing.qcow2"))
    outside = submit(redis_url, "/etc/shadow")
    mismatch = submit(redis_url, stage_sample("qcow2-v3-c64k", "claimed.img"), claimed_format="raw")
    for image_id, reason in (
        (refused, "backing_file"),
        (outside, "outside the import directories"),
        (mismatch, "claimed_format"),
    ):
        record = wait_final(records, image_id)
        assert record["status"] == "killed"
        assert reason in record["reason"]
        assert record["attempts"] == 1  # refusals are never retried
        assert not [name for name in rbd_names(ceph) if name.startswith(image_id)]


def test_idempotent_by_image_id(
    workers: Workers, records: RedisRecords, redis_url: str, stage_sample: StageSample
) -> None:
    source = stage_sample("qcow2-v3-c64k", "idem.qcow2")
    image_id = submit(redis_url, source)
    first = wait_final(records, image_id)
    assert first["status"] == "active"
    # An active id: nothing is redone. Looked at once the task has ended.
    wait_task_ended(workers, send_import(redis_url, source, image_id))
    again = records.get(image_id)
    assert again is not None and again["attempts"] == 1 and again["updated_at"] == first["updated_at"]
    # A killed id starts a new attempt.
    killed_id = submit(redis_url, "/etc/shadow")
    assert wait_final(records, killed_id)["status"] == "killed"
    submit(redis_url, source, killed_id)
    wait_until(
        lambda: None if (records.get(killed_id) or {}).get("attempts") == 2 else f"{records.get(killed_id)}",
        f"{killed_id} retried",
    )
    retried = wait_final(records, killed_id)
    assert retried is not None and retried["status"] == "active" and retried["attempts"] == 2


@pytest.mark.usefixtures("recovers")
@pytest.mark.parametrize("victim", ["child", "whole-worker"])
def test_a_killed_worker_loses_no_job_and_runs_none_twice(
    victim: str, workers: Workers, records: RedisRecords, redis_url: str, ceph: Ceph, imports: Path, tmp_path: Path
) -> None:
    source = long_source(tmp_path, imports, f"long-{victim}")
    image_id = submit(redis_url, source)
    record = wait_stage(records, image_id, ("convert", "checksum"))
    _, _, pid = record["owner"].rpartition("-")
    if victim == "child":
        # reject_on_worker_lost: the job goes straight back to the queue; the
        # next delivery waits for the dead child's lease to expire.
        os.kill(int(pid), signal.SIGKILL)
    else:
        assert _is_parent(workers.processes["w1"].pid, int(pid))
        workers.kill("w1")
        # The dead worker never acknowledged the job: Redis hands it out
        # again once the visibility timeout has passed. (A wait for a
        # configured time, not a guess at how fast something happens.)
        time.sleep(VISIBILITY_TIMEOUT + 1)
        workers.start("w1")
    final = wait_final(records, image_id)
    assert final["status"] == "active", final
    assert final["attempts"] == 2
    assert final["checksum"] == reference_md5(Path(source), "qcow2", tmp_path)
    names = rbd_names(ceph)
    assert names.count(image_id) == 1
    assert not [name for name in names if name.startswith(image_id + ".tmp.")]


def _is_parent(parent: int, child: int) -> bool:
    try:
        status = Path(f"/proc/{child}/status").read_text()
    except FileNotFoundError:
        return False
    ppid = int(next(line for line in status.splitlines() if line.startswith("PPid:")).split()[1])
    return ppid == parent


@pytest.mark.usefixtures("recovers")
def test_a_redis_restart_mid_job_does_not_lose_it(
    workers: Workers, records: RedisRecords, redis_url: str, imports: Path, tmp_path: Path
) -> None:
    source = long_source(tmp_path, imports, "long-redis")
    image_id = submit(redis_url, source)
    wait_stage(records, image_id, ("convert", "checksum"))
    restart_redis(redis_url)  # append-only: the jobs and records survive the restart
    final = wait_final(records, image_id)
    assert final["status"] == "active", final
    # The worker rode out the restart and still takes jobs.
    assert all(process.poll() is None for process in workers.processes.values())
    after = submit(redis_url, "/etc/shadow")
    assert wait_final(records, after)["status"] == "killed"


@pytest.mark.usefixtures("recovers")
def test_a_paused_ceph_ends_the_job_killed_with_a_clear_reason_and_nothing_left(
    workers: Workers, records: RedisRecords, redis_url: str, ceph: Ceph, stage_sample: StageSample
) -> None:
    from celery import Celery

    source = stage_sample("qcow2-data-offsets", "paused.qcow2")
    (osd,) = ceph.pids("osd")
    os.kill(osd, signal.SIGSTOP)
    try:
        image_id = submit(redis_url, source)
        record = wait_final(records, image_id)
    finally:
        os.kill(osd, signal.SIGCONT)
    # The same cluster must serve again (a rebuild by `recovers` would make
    # the "nothing left" check below prove nothing, so it is not done here).
    ceph.wait_healthy()
    assert record["status"] == "killed"
    assert (
        record["outcome"] == "failed"
        and "gave up after" in record["reason"]
        and ("Ceph" in record["reason"] or "rbd" in record["reason"].lower())
    )
    assert record["attempts"] == 3  # the first try and two retries
    removed = (
        Celery(broker=redis_url, backend=redis_url)
        .send_task("diskpipe.cleanup", queue="diskpipe")
        .get(timeout=RECOVERY_TIMEOUT)
    )
    assert all(name.startswith(image_id) for name in removed["store"])
    assert not [name for name in rbd_names(ceph) if name.startswith(image_id)]


def test_fifty_jobs_at_once_on_two_workers(
    workers: Workers, records: RedisRecords, redis_url: str, ceph: Ceph, stage_sample: StageSample
) -> None:
    workers.start("w2", concurrency=1)
    source = stage_sample("qcow2-v3-c64k", "load.qcow2")
    ids = [submit(redis_url, source, f"load-{index:02d}-{uuid.uuid4().hex[:6]}") for index in range(50)]
    finals = [wait_final(records, image_id, timeout=600) for image_id in ids]
    assert [record["status"] for record in finals] == ["active"] * 50
    assert all(record["attempts"] == 1 for record in finals)
    names = rbd_names(ceph)
    assert all(names.count(image_id) == 1 for image_id in ids)
    assert len({record["checksum"] for record in finals}) == 1
    workers.kill("w2")


def test_cancel_and_delete_through_the_cli(
    workers: Workers,
    records: RedisRecords,
    redis_url: str,
    ceph: Ceph,
    imports: Path,
    tmp_path: Path,
    stage_sample: StageSample,
) -> None:
    env = workers.env()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "diskpipe", *args], env=env, capture_output=True, text=True, check=False
        )

    source = long_source(tmp_path, imports, "long-cancel")
    image_id = submit(redis_url, source)
    wait_stage(records, image_id, ("convert", "checksum"))
    cancelled = cli("cancel", image_id, "--output=json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["status"] == "killed"
    assert not [name for name in rbd_names(ceph) if name.startswith(image_id)]

    done = cli("import", stage_sample("qcow2-v3-c64k", "cli.qcow2"), "--output=json", "--quiet")
    assert done.returncode == 0, done.stderr
    stored = json.loads(done.stdout)["id"]
    assert cli("status", stored, "--output=json").returncode == 0
    assert stored in cli("list").stdout
    assert cli("protect", stored).returncode == 0
    refused = cli("delete", stored)
    assert refused.returncode == 1 and "protected" in refused.stderr
    assert cli("unprotect", stored).returncode == 0
    ceph.rbd("clone", f"rbd/{stored}@snap", "rbd/a-clone")
    in_use = cli("delete", stored)
    assert in_use.returncode == 1 and "in use" in in_use.stderr
    ceph.rbd("rm", "rbd/a-clone")
    deleted = cli("delete", stored, "--output=json")
    assert deleted.returncode == 0, deleted.stderr
    assert json.loads(deleted.stdout)["status"] == "deleted"
    assert stored not in rbd_names(ceph)
