"""A delivery that lost its lease writes nothing more.

When another delivery has taken a job over (its lease expired: the first
worker was cut off, paused or slow), the first one's attempt number is
stale: the record refuses its changes, even in the race where the takeover
lands between its read and its write, and the pipeline stops its work as
soon as its heartbeat sees the lease gone. Real Redis, real SQLite, real
qemu-img and the file store; tests/test_multihost.py shows the same across
hosts with Ceph.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from diskpipe.converter.stores.file import FileStore
from diskpipe.jobs import sources
from diskpipe.jobs.connection import redis_client
from diskpipe.jobs.lease import Lease
from diskpipe.jobs.pipeline import Environment, ImportJob, run_import
from diskpipe.jobs.records import RedisRecords, SqliteRecords, new_record
from diskpipe.jobs.states import ACTIVE, KILLED, SAVING, StaleAttempt
from tests.conftest import RECOVERY_TIMEOUT, ROOT, wait_until


@pytest.fixture(params=["sqlite", "redis"])
def records(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "sqlite":
        return SqliteRecords(str(tmp_path / "records.sqlite"))
    return RedisRecords(redis_client(request.getfixturevalue("redis_url")))


def _taken_over(records: Any) -> str:
    """A record whose attempt 1 was taken over by attempt 2."""
    image_id = f"fence-{uuid.uuid4().hex[:8]}"
    assert records.create(new_record(image_id))
    records.transition(image_id, "queued", SAVING, attempts=1, owner="first")
    records.transition(image_id, SAVING, SAVING, attempts=2, owner="second")
    return image_id


@pytest.mark.parametrize("wanted", [KILLED, ACTIVE])
def test_a_stale_attempt_cannot_move_the_record(records: Any, wanted: str) -> None:
    image_id = _taken_over(records)
    before = records.get(image_id)
    with pytest.raises(StaleAttempt, match="attempt 1 is stale, the record is at attempt 2"):
        records.transition(image_id, SAVING, wanted, fence=1, reason="from the first attempt")
    assert records.get(image_id) == before
    assert records.transition(image_id, SAVING, wanted, fence=2)["status"] == wanted


def test_a_stale_attempt_cannot_update_the_record(records: Any) -> None:
    """Field updates (the sealed checksums a later delivery adopts) are fenced
    like transitions: the first attempt's write is refused, the record kept."""
    image_id = _taken_over(records)
    before = records.get(image_id)
    with pytest.raises(StaleAttempt, match="attempt 1 is stale"):
        records.update(image_id, fence=1, sealed_checksums={"size": 1})
    assert records.get(image_id) == before
    assert records.update(image_id, fence=2, sealed_checksums={"size": 1})["sealed_checksums"] == {"size": 1}


def test_the_redis_swap_itself_checks_the_attempt(redis_url: str) -> None:
    """The takeover lands after the stale writer read the record (status
    still `saving`, as it expects) and before its compare-and-set."""
    records = RedisRecords(redis_client(redis_url))
    image_id = f"fence-{uuid.uuid4().hex[:8]}"
    assert records.create(new_record(image_id))
    records.transition(image_id, "queued", SAVING, attempts=1, owner="first")
    read = records.get

    def read_then_taken_over(wanted_id: str) -> dict[str, Any] | None:
        seen = read(wanted_id)
        records.get = read  # type: ignore[method-assign]
        records.transition(image_id, SAVING, SAVING, attempts=2, owner="second")
        return seen

    records.get = read_then_taken_over  # type: ignore[method-assign]
    with pytest.raises(StaleAttempt):
        records.transition(image_id, SAVING, KILLED, fence=1, reason="from the first attempt")
    after = read(image_id)
    assert after is not None and (after["status"], after["attempts"], after["owner"]) == (SAVING, 2, "second")


@pytest.fixture
def slow_qemu_img(monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu-img converting at 2 MiB/s: the job is mid-conversion for seconds."""
    monkeypatch.setenv("DISKPIPE_QEMU_IMG", str(ROOT / "tests" / "qemu_img_throttled.sh"))
    monkeypatch.setenv("DISKPIPE_TEST_QEMU_RATE", "2M")


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "imports" / "disk.qcow2"
    path.parent.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 24M", str(path)], check=True, capture_output=True)
    yield path


class _QuickBeatLease(Lease):
    """A lease that keeps a long TTL but beats every 0.5 s: a takeover is
    seen within a beat, while a beat delayed by a busy machine (or a slow
    start between taking the lease and the first beat) cannot let the lease
    expire before the test takes it over. A TTL of seconds made the beat
    race the clock: the lease ran out on its own and the delivery ended
    before the takeover it was meant to notice."""

    def start_heartbeat(self, on_tick: Callable[[], None] | None = None, interval: float | None = None) -> None:
        super().start_heartbeat(on_tick, 0.5 if interval is None else interval)


@pytest.mark.usefixtures("slow_qemu_img")
def test_a_delivery_that_lost_its_lease_stops_and_writes_nothing_more(
    redis_url: str, tmp_path: Path, source: Path
) -> None:
    client = redis_client(redis_url)
    records = RedisRecords(client)
    store = FileStore(tmp_path / "store")
    env = Environment(
        records=records,
        store=store,
        import_config=sources.ImportConfig(allowed_dirs=(str(source.parent),), staging_dir=str(tmp_path / "staging")),
        lease=lambda image_id: _QuickBeatLease(client, image_id, "first-owner", ttl=RECOVERY_TIMEOUT),
        owner="first-owner",
    )
    job = ImportJob(f"fence-{uuid.uuid4().hex[:8]}", str(source))
    outcome: list[dict[str, Any]] = []
    delivery = threading.Thread(target=lambda: outcome.append(run_import(job, env, "task-1")))
    delivery.start()
    try:
        wait_until(
            lambda: (
                None
                if (records.get_progress(job.image_id) or {}).get("stage") == "convert"
                else f"not converting yet: {records.get_progress(job.image_id)}"
            ),
            "the first delivery converting",
        )
        # Another delivery takes the job over, as one does once a lease has
        # expired: the lease is its now and the record at its attempt.
        client.set(Lease.PREFIX + job.image_id, "second-owner", px=60_000)
        taken = records.transition(job.image_id, SAVING, SAVING, attempts=2, owner="second-owner")
        records.set_progress(job.image_id, {"stage": "fetch", "percent": 0.0, "bytes": 0, "at": time.time()})
        progress = records.get_progress(job.image_id)
    finally:
        delivery.join(timeout=RECOVERY_TIMEOUT)
    assert not delivery.is_alive()
    # It stopped mid-conversion (at 2 MiB/s, 24 MiB take 12 s) and ended
    # without touching the record, the progress or the second's lease.
    assert outcome and outcome[0]["attempts"] == 2
    assert records.get(job.image_id) == taken
    assert records.get_progress(job.image_id) == progress
    assert client.get(Lease.PREFIX + job.image_id) == b"second-owner"
    assert not store.exists(job.image_id)
    assert not [entry.name for entry in (tmp_path / "store").iterdir()]


def test_a_lost_lease_is_reported_once_and_the_beat_goes_on(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A lease that expires while its owner still beats is said once (not at
    every beat, as it used to be: "lost to None" every few seconds), and the
    beat keeps calling `on_tick` (the job's cancellation check)."""
    client = redis_client(redis_url)
    lease = Lease(client, f"lease-{uuid.uuid4().hex}", "owner", ttl=30.0)
    assert lease.try_acquire()
    ticks: list[float] = []
    client.delete(lease.key)  # the lease is gone: expired, nobody holds it
    with caplog.at_level("WARNING", logger="diskpipe.jobs.lease"):
        lease.start_heartbeat(on_tick=lambda: ticks.append(time.monotonic()), interval=0.05)
        wait_until(lambda: None if len(ticks) >= 10 else f"{len(ticks)} ticks", "ten heartbeats")
        client.set(lease.key, "someone-else")  # taken over later: still the one warning
        count = len(ticks)
        wait_until(lambda: None if len(ticks) >= count + 5 else "waiting", "five more heartbeats")
        lease.release()
    warnings = [record.getMessage() for record in caplog.records if record.name == "diskpipe.jobs.lease"]
    assert warnings == [f"lease {lease.key} expired"]
    assert lease.lost.is_set()
    assert lease.holder() == "someone-else"  # release never deletes another owner's lease
    client.delete(lease.key)


def test_a_lost_lease_is_fenced_even_when_asking_who_took_it_fails(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The renewal says the lease is gone; the question that follows (who
    holds it now, for the log) fails — Redis dropped the connection between
    the two calls, a fault a test cannot time for real, hence the stand-in.
    The lease is lost at once all the same: the job must stop writing."""
    client = redis_client(redis_url)
    lease = Lease(client, f"lease-{uuid.uuid4().hex}", "owner", ttl=30.0)
    assert lease.try_acquire()
    client.delete(lease.key)

    def connection_dropped() -> str | None:
        raise ConnectionError("Redis closed the connection")

    monkeypatch.setattr(lease, "holder", connection_dropped)
    lease.start_heartbeat(interval=0.05)
    try:
        wait_until(lambda: None if lease.lost.is_set() else "still held", "the lease counted as lost")
    finally:
        lease.release()
