"""The worker is a Celery worker: real `celery -A diskpipe.tasks` processes
over the tests' real Redis, held to what a Celery user expects.

The broker is chosen by Celery's rules (`-b`, CELERY_BROKER_URL) with
diskpipe's aliases after them; task states, results and exceptions tell the
truth to an AsyncResult, also in a client that never imports diskpipe; task
events reach a real event receiver; tasks are routed by name; transient
failures are retried by Celery's own autoretry/backoff with each wait in the
image's record (a source that does not answer, a paused Ceph OSD, a paused
worker that lost its lease), cleared when the job ends; a Redis restart is
one WARNING line in the worker's log and no traceback. The file store keeps
most of these tests fast.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from diskpipe.jobs.connection import redis_client
from diskpipe.jobs.records import RedisRecords
from tests.conftest import FAULT_TEST_TIMEOUT, RECOVERY_TIMEOUT, ROOT, Ceph, restart_redis, wait_until
from tests.workers import Worker, answers_ping, start_worker

pytestmark = pytest.mark.timeout(FAULT_TEST_TIMEOUT)

# Small retry settings for the test worker, set the way an operator would:
# DISKPIPE_CELERY_* variables over the config file. Waits: 2, 4, 4, 4 s.
MAX_RETRIES = 4
RETRY_ENV = {
    "DISKPIPE_CELERY_MAX_RETRIES": str(MAX_RETRIES),
    "DISKPIPE_CELERY_RETRY_BACKOFF": "2",
    "DISKPIPE_CELERY_RETRY_BACKOFF_MAX": "4",
}
EXPECTED_WAITS = {2: 2, 3: 4, 4: 4, 5: 4}  # attempt -> seconds waited before it
LOG_LEVEL = re.compile(r": (DEBUG|INFO|WARNING|ERROR|CRITICAL)/")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any broker setting of its own."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key
        not in ("CELERY_BROKER_URL", "DISKPIPE_BROKER_URL", "DISKPIPE_CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")
    }
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def run_python(args: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """`python *args`, its output captured as text."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=RECOVERY_TIMEOUT, check=False
    )


def on_db(url: str, db: int) -> str:
    return url.rsplit("/", 1)[0] + f"/{db}"


CELERY = [sys.executable, "-m", "celery", "-A", "diskpipe.tasks"]


@dataclass
class Setup:
    broker: str
    config: Path
    base: Path
    imports: Path
    store: Path
    web_root: Path
    up_port: int  # an HTTP source the tests start serving when they choose
    down_port: int  # an HTTP source that never answers


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Setup:
    base = tmp_path_factory.mktemp("conventions")
    imports, store, web_root = base / "imports", base / "store", base / "web"
    for directory in (imports, store, web_root):
        directory.mkdir()
    up_port, down_port = free_port(), free_port()
    config = base / "diskpipe.toml"
    config.write_text(
        f"""
[store]
kind = "file"
directory = "{store}"
[import]
allowed_dirs = ["{imports}"]
staging_dir = "{base / "staging"}"
allowed_ports = [{up_port}, {down_port}]
allowed_networks = ["127.0.0.1/32"]
connect_timeout = 3
"""
    )
    return Setup(redis_url, config, base, imports, store, web_root, up_port, down_port)


@pytest.fixture(scope="module")
def worker(setup: Setup) -> Iterator[Worker]:
    """A worker as the README starts one (mingle and gossip on), its broker
    given by Celery's global `-b`, the only broker setting it has."""
    env = clean_env(DISKPIPE_CONFIG=str(setup.config), **RETRY_ENV)
    command = [*CELERY, "-b", setup.broker, "worker", "-l", "info", "-c", "2"]
    started = start_worker(command, env, setup.base / "worker.log", "conventions", setup.broker)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def app(setup: Setup) -> Iterator[Any]:
    """The client a diskpipe service submits with: the factory behind
    `diskpipe.tasks.app`, with the worker's `[celery]` section (defaults)."""
    from diskpipe.tasks.factory import create_app
    from diskpipe.tasks.settings import CeleryConfig

    client = create_app(CeleryConfig(), broker=setup.broker)
    yield client
    client.close()


@pytest.fixture
def records(redis_url: str) -> RedisRecords:
    return RedisRecords(redis_client(redis_url))


def small_image(directory: Path, name: str) -> Path:
    path = directory / name
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 2M", str(path)], check=True, capture_output=True)
    return path


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def submit(app: Any, image_id: str, source: str) -> Any:
    # No queue=: the app's task_routes send diskpipe.* to the [celery] queue.
    return app.send_task("diskpipe.import_image", kwargs={"image_id": image_id, "source": source})


def is_plain_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


# -- the broker -----------------------------------------------------------------


def reported_broker(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(
        [*CELERY, *args, "report"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(r"^broker_url: '(.*)'$", done.stdout, re.MULTILINE)
    assert found is not None, done.stdout[-3000:]
    return found.group(1)


def test_report_shows_the_broker_chosen_by_celerys_rules_then_diskpipes(tmp_path: Path) -> None:
    config = tmp_path / "diskpipe.toml"
    config.write_text('[celery]\nbroker_url = "redis://127.0.0.1:7/4"\n')
    every = {
        "DISKPIPE_CONFIG": str(config),
        "DISKPIPE_BROKER_URL": "redis://127.0.0.1:7/3",
        "CELERY_BROKER_URL": "redis://127.0.0.1:7/2",
    }
    # `celery report` masks a password it does not have; host, port and db stay.
    assert reported_broker(["-b", "redis://127.0.0.1:7/1"], clean_env(**every)).endswith("@127.0.0.1:7/1")
    assert reported_broker([], clean_env(**every)).endswith("@127.0.0.1:7/2")
    del every["CELERY_BROKER_URL"]
    assert reported_broker([], clean_env(**every)).endswith("@127.0.0.1:7/3")
    del every["DISKPIPE_BROKER_URL"]
    assert reported_broker([], clean_env(**every)).endswith("@127.0.0.1:7/4")
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert reported_broker([], clean_env(DISKPIPE_CONFIG=str(empty))).endswith("@127.0.0.1:6379/0")


def test_a_worker_without_a_broker_says_once_at_warning_which_default_it_uses(setup: Setup, worker: Worker) -> None:
    # The default (127.0.0.1:6379) may be another Redis on this machine, so
    # this worker's default is pointed at a database of the tests' own Redis
    # before the app is built: what is tested is the worker saying so.
    default = on_db(setup.broker, 7)
    launcher = (
        "import sys; import diskpipe.tasks.settings as settings; settings.DEFAULT_BROKER = sys.argv.pop(1); "
        "from celery.__main__ import main; sys.argv[0] = 'celery'; main()"
    )
    command = [sys.executable, "-c", launcher, default, "-A", "diskpipe.tasks", "worker", "-l", "info", "-c", "1"]
    # A store of its own: its start-up cleanup asks its own Redis database
    # which temporaries are live, and would find none of the other worker's.
    config = setup.base / "no-broker.toml"
    config.write_text(f'[store]\nkind = "file"\ndirectory = "{setup.base / "no-broker-store"}"\n')
    env = clean_env(DISKPIPE_CONFIG=str(config))
    log = setup.base / "no-broker.log"
    unconfigured = start_worker(command, env, log, "no-broker", default)
    try:
        lines = [line for line in unconfigured.text().splitlines() if "no broker configured" in line]
    finally:
        unconfigured.stop()
    assert len(lines) == 1, unconfigured.text()[-3000:]
    assert "WARNING/MainProcess] no broker configured" in lines[0]  # the worker's log format, not bare stderr
    assert lines[0].endswith(f"using {default}")
    # A worker given a broker says nothing of the kind.
    assert "no broker configured" not in worker.text()


# -- task states, results, events and routing -----------------------------------


class Events:
    """A real event receiver (what Flower and `celery events` use) on a thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[dict[str, Any]] = []
        self.ready = threading.Event()
        self.receiver: Any = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.app.connection_for_read() as connection:
            self.receiver = self.app.events.Receiver(connection, handlers={"*": self.seen.append})
            self.ready.set()
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def __enter__(self) -> Events:
        self.thread.start()
        assert self.ready.wait(60)
        # The receiver's queue is bound once it consumes: wait for the
        # workers' heartbeat events to arrive through it.
        wait_until(lambda: None if self.types() else "no event yet", "the event receiver receiving", 120)
        return self

    def __exit__(self, *_: object) -> None:
        self.receiver.should_stop = True
        self.thread.join(30)

    def types(self, task_id: str | None = None) -> list[str]:
        return [event["type"] for event in list(self.seen) if task_id is None or event.get("uuid") == task_id]

    def of(self, task_id: str, kind: str) -> dict[str, Any]:
        return next(event for event in list(self.seen) if event.get("uuid") == task_id and event["type"] == kind)


def test_task_states_results_and_events_tell_the_truth(
    app: Any, worker: Worker, setup: Setup, records: RedisRecords
) -> None:
    from diskpipe.tasks.errors import ImageRefused

    good = small_image(setup.imports, "good.qcow2")
    with Events(app) as events:
        active = submit(app, new_id("active"), str(good))
        refused = submit(app, new_id("refused"), "/etc/shadow")
        record = active.get(timeout=RECOVERY_TIMEOUT)
        with pytest.raises(ImageRefused) as raised:
            refused.get(timeout=RECOVERY_TIMEOUT)

        def all_events() -> str | None:
            wanted = {
                active.id: ["task-sent", "task-received", "task-started", "task-succeeded"],
                refused.id: ["task-sent", "task-received", "task-started", "task-failed"],
            }
            missing = {
                task: [kind for kind in kinds if kind not in events.types(task)] for task, kinds in wanted.items()
            }
            return None if not any(missing.values()) else f"missing {missing}"

        wait_until(all_events, "task events for both jobs", 120)
        failed_event = events.of(refused.id, "task-failed")
        succeeded_event = events.of(active.id, "task-succeeded")

    assert active.state == "SUCCESS"
    assert record["status"] == "active" and record["outcome"] == "active" and record["retry"] is None
    assert record["task_id"] == active.id and is_plain_uuid(active.id)
    assert "'status': 'active'" in succeeded_event["result"]

    assert refused.state == "FAILURE" and is_plain_uuid(refused.id)
    error = raised.value
    assert error.record["status"] == "killed" and error.record["outcome"] == "refused"
    assert "outside the import directories" in error.record["reason"]
    assert isinstance(refused.result, ImageRefused)
    assert "ImageRefused" in failed_event["exception"]
    assert records.get(error.record["id"]) == error.record

    # A client that never imports diskpipe: Celery rebuilds the exception by
    # name (a stand-in class in celery.exceptions), with the record as its
    # second argument.
    plain = (
        "import sys; from celery import Celery; "
        "app = Celery(broker=sys.argv[1], backend=sys.argv[1]); result = app.AsyncResult(sys.argv[2]); "
        "error = result.get(propagate=False); "
        "print(result.state, type(error).__name__, error.args[1]['outcome'], 'diskpipe' in sys.modules)"
    )
    # Not from the checkout: diskpipe is not importable there by accident.
    shown = run_python(["-c", plain, setup.broker, refused.id], clean_env(), cwd=setup.base)
    assert shown.stdout.split() == ["FAILURE", "ImageRefused", "refused", "False"], shown.stderr[-3000:]


def test_a_plain_celery_app_must_name_the_queue_diskpipes_app_routes_by_name(
    app: Any, worker: Worker, setup: Setup, redis_url: str
) -> None:
    import redis
    from celery import Celery

    plain = Celery(broker=setup.broker, backend=setup.broker)
    source = str(small_image(setup.imports, "plain.qcow2"))
    lost = plain.send_task("diskpipe.import_image", kwargs={"image_id": new_id("plain"), "source": source})
    named = plain.send_task(
        "diskpipe.import_image", kwargs={"image_id": new_id("plain"), "source": source}, queue="diskpipe"
    )
    routed = submit(app, new_id("routed"), source)
    assert named.get(timeout=RECOVERY_TIMEOUT)["status"] == "active"
    assert routed.get(timeout=RECOVERY_TIMEOUT)["status"] == "active"
    assert routed.state == "SUCCESS"
    # Without queue= a plain app publishes to Celery's default queue, which
    # no diskpipe worker reads: the message waits there.
    client = redis.Redis.from_url(redis_url)
    waiting = [message for message in client.lrange("celery", 0, -1) if lost.id.encode() in message]
    client.delete("celery")
    assert len(waiting) == 1 and lost.state == "PENDING"


def test_diskpipe_tasks_app_is_the_celery_app_and_routes_by_name(worker: Worker, setup: Setup) -> None:
    # In a process of its own, as a service would use it: built from
    # CELERY_BROKER_URL on first use, and still the app after every
    # submodule of diskpipe.tasks has been imported.
    script = (
        "import sys\n"
        "from diskpipe.tasks import app\n"
        "import diskpipe.tasks, diskpipe.tasks.factory, diskpipe.tasks.jobs, diskpipe.tasks.worker\n"
        "assert diskpipe.tasks.app is app, diskpipe.tasks.app\n"
        "result = app.send_task('diskpipe.import_image', kwargs={'image_id': sys.argv[1], 'source': sys.argv[2]})\n"
        "print(type(app).__name__, app.conf.broker_url, result.get(timeout=600)['status'])\n"
    )
    source = str(small_image(setup.imports, "module-app.qcow2"))
    env = clean_env(DISKPIPE_CONFIG=str(setup.config), CELERY_BROKER_URL=setup.broker)
    done = run_python(["-c", script, new_id("module-app"), source], env)
    assert done.stdout.split() == ["DiskpipeCelery", setup.broker, "active"], done.stderr[-3000:]


def test_the_command_line_submits_a_task_whose_id_is_a_plain_uuid(
    worker: Worker, setup: Setup, records: RedisRecords
) -> None:
    from celery import Celery

    source = small_image(setup.imports, "cli.qcow2")
    env = clean_env(DISKPIPE_CONFIG=str(setup.config))
    done = run_python(
        ["-m", "diskpipe", "import", str(source), "--broker", setup.broker, "--output=json", "--quiet"], env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = records.get(json.loads(done.stdout)["id"])
    assert record is not None and record["status"] == "active"
    assert is_plain_uuid(record["task_id"]), record["task_id"]
    result = Celery(broker=setup.broker, backend=setup.broker).AsyncResult(record["task_id"])
    assert result.state == "SUCCESS" and result.result["id"] == record["id"]


# -- retries ----------------------------------------------------------------------


def retry_state(records: RedisRecords, image_id: str) -> tuple[int, int] | None:
    """(attempt, wait) while the record says it waits for a retry."""
    record = records.get(image_id)
    if record is None or record["status"] != "saving" or not record.get("retry"):
        return None
    found = re.match(r"retrying in (\d+) s: (.+)", record.get("reason") or "")
    if found is None:
        return None
    assert "cannot fetch" in found.group(2), record
    assert record["retry"]["of"] == MAX_RETRIES + 1, record
    return record["retry"]["attempt"], int(found.group(1))


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_transient_failure_is_retried_with_backoff_in_the_record_and_ends_active_once_it_passes(
    app: Any, worker: Worker, setup: Setup, records: RedisRecords
) -> None:
    small_image(setup.web_root, "later.qcow2")
    image_id = new_id("retried")
    result = submit(app, image_id, f"http://127.0.0.1:{setup.up_port}/later.qcow2")
    # Nothing listens yet: the download cannot connect, a failure worth retrying.
    seen: list[tuple[int, int]] = []

    def waiting() -> str | None:
        state = retry_state(records, image_id)
        if state is not None and state not in seen:
            seen.append(state)
        return None if state is not None and result.state == "RETRY" else f"{records.get(image_id)} {result.state}"

    wait_until(waiting, "the record and the task waiting for a retry")
    handler = lambda *args: Quiet(*args, directory=str(setup.web_root))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", setup.up_port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        record = result.get(timeout=RECOVERY_TIMEOUT)
    finally:
        server.shutdown()
        server.server_close()
    assert all(EXPECTED_WAITS[attempt] == wait for attempt, wait in seen), seen
    assert record["status"] == "active" and record["outcome"] == "active"
    assert record["retry"] is None and record["reason"] is None
    assert record["attempts"] >= seen[0][0]
    assert result.state == "SUCCESS" and record["task_id"] == result.id
    assert records.get(image_id) == record


def test_a_transient_failure_that_lasts_gives_up_with_import_failed_and_a_cancel_stops_a_waiting_job(
    app: Any, worker: Worker, setup: Setup, records: RedisRecords
) -> None:
    from diskpipe.tasks.errors import ImportCancelled, ImportFailed

    source = f"http://127.0.0.1:{setup.down_port}/never.qcow2"
    with Events(app) as events:
        lasting = submit(app, new_id("given-up"), source)
        cancelled_id = new_id("cancelled")
        cancelled = submit(app, cancelled_id, source)
        wait_until(lambda: None if retry_state(records, cancelled_id) else "not waiting", "a job waiting to retry")
        app.send_task("diskpipe.cancel_image", args=[cancelled_id]).get(timeout=RECOVERY_TIMEOUT)
        with pytest.raises(ImportCancelled) as stopped:
            cancelled.get(timeout=RECOVERY_TIMEOUT)
        with pytest.raises(ImportFailed) as failed:
            lasting.get(timeout=RECOVERY_TIMEOUT)
        wait_until(
            lambda: None if "task-failed" in events.types(lasting.id) else str(events.types(lasting.id)),
            "the given-up job's task-failed event",
            120,
        )
        retried_events = events.types(lasting.id).count("task-retried")

    record = failed.value.record
    assert lasting.state == "FAILURE"
    assert record["status"] == "killed" and record["outcome"] == "failed"
    assert record["reason"].startswith(f"gave up after {MAX_RETRIES} retries: cannot fetch")
    assert record["attempts"] == MAX_RETRIES + 1 and record["retry"] is None
    assert retried_events == MAX_RETRIES
    assert records.get(record["id"]) == record

    assert cancelled.state == "FAILURE"
    assert stopped.value.record["outcome"] == "cancelled" and stopped.value.record["retry"] is None


def test_a_paused_ceph_is_waited_out_by_retries_and_the_job_ends_active(
    setup: Setup, ceph_recovers: Ceph, records: RedisRecords
) -> None:
    # The store fails for real: the OSD is stopped while the job writes. A
    # worker of its own (RBD store, retries enough to outlast the pause and
    # Ceph's recovery) on a queue of its own.
    from diskpipe.tasks.factory import create_app
    from diskpipe.tasks.settings import CeleryConfig

    ceph = ceph_recovers
    queue = "diskpipe-rbd"
    config = setup.base / "rbd.toml"
    config.write_text(
        setup.config.read_text().replace('kind = "file"', 'kind = "rbd"')
        + f'[rbd]\nconf = "{ceph.conf}"\nconnect_timeout = 5\nop_timeout = 6\n'
    )
    retries = {**RETRY_ENV, "DISKPIPE_CELERY_MAX_RETRIES": "30"}
    env = clean_env(DISKPIPE_CONFIG=str(config), DISKPIPE_CELERY_QUEUE=queue, **retries)
    command = [*CELERY, "-b", setup.broker, "worker", "-l", "info", "-c", "1", "--without-mingle", "--without-gossip"]
    rbd_worker = start_worker(command, env, setup.base / "rbd.log", "rbd", setup.broker)
    client = create_app(CeleryConfig(queue=queue), broker=setup.broker)
    image_id = new_id("ceph-paused")
    (osd,) = ceph.pids("osd")
    try:
        os.kill(osd, signal.SIGSTOP)
        try:
            result = submit(client, image_id, str(small_image(setup.imports, "ceph.qcow2")))

            def waiting() -> str | None:
                record = records.get(image_id) or {}
                found = re.match(r"retrying in (\d+) s: ", record.get("reason") or "")
                ready = found and record["status"] == "saving" and record.get("retry") and result.state == "RETRY"
                return None if ready else f"{record} {result.state}"

            wait_until(waiting, "the job waiting to retry the paused store")
            waited = records.get(image_id)
        finally:
            os.kill(osd, signal.SIGCONT)
        ceph.wait_healthy()
        final = result.get(timeout=RECOVERY_TIMEOUT)
    finally:
        client.close()
        rbd_worker.stop()
    assert waited is not None and waited["retry"]["of"] == 31
    assert "ceph" in waited["reason"].lower() or "rbd" in waited["reason"].lower(), waited["reason"]
    assert final["status"] == "active" and final["outcome"] == "active"
    assert final["retry"] is None and final["reason"] is None and final["attempts"] >= 2
    assert final["locations"][0]["url"].endswith(f"/rbd/{image_id}/snap")
    names = ceph.rbd("ls").split()
    assert names.count(image_id) == 1 and not [name for name in names if name.startswith(image_id + ".tmp.")]


def test_an_image_adopted_after_a_retry_ends_with_the_retry_cleared(
    setup: Setup, records: RedisRecords, redis_url: str
) -> None:
    # A real fault: the worker child is paused mid-job past its lease's TTL,
    # so on waking it has lost the lease; it stored the image all the same,
    # retries (Transient) and the retry adopts the stored image. A worker of
    # its own (short lease) on a queue of its own.
    from diskpipe.jobs.lease import Lease
    from diskpipe.tasks.factory import create_app
    from diskpipe.tasks.settings import CeleryConfig

    queue = "diskpipe-short-lease"
    env = clean_env(
        DISKPIPE_CONFIG=str(setup.config), DISKPIPE_CELERY_LEASE_TTL="2", DISKPIPE_CELERY_QUEUE=queue, **RETRY_ENV
    )
    command = [*CELERY, "-b", setup.broker, "worker", "-l", "info", "-c", "1", "--without-mingle", "--without-gossip"]
    short = start_worker(command, env, setup.base / "short-lease.log", "short-lease", setup.broker)
    client = create_app(CeleryConfig(queue=queue), broker=setup.broker)
    try:
        image_id = new_id("adopted")
        result = submit(client, image_id, str(long_image(setup.imports)))
        wait_running(records, image_id)
        record = records.get(image_id)
        assert record is not None
        child = int(record["owner"].rpartition("-")[2])
        os.kill(child, signal.SIGSTOP)
        try:
            lease = Lease(redis_client(redis_url), image_id, "test")
            wait_until(lambda: "still held" if lease.held_by_anyone() else None, "the paused job's lease expiring")
        finally:
            os.kill(child, signal.SIGCONT)
        final = result.get(timeout=RECOVERY_TIMEOUT)
    finally:
        client.close()
        short.stop()
    assert "lost the lease while working; retrying in 2 s (attempt 2 of 5)" in short.text()
    assert final["status"] == "active" and final["attempts"] == 2
    assert final["outcome"] == "active" and final["retry"] is None and final["reason"] is None


def test_a_bug_in_a_retried_attempt_ends_the_record_with_the_retry_cleared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bug cannot be caused for real: injected, as in test_job_faults.
    from diskpipe.converter.stores.file import FileStore
    from diskpipe.jobs import pipeline
    from diskpipe.jobs.records import SqliteRecords, new_record
    from diskpipe.jobs.sources import ImportConfig

    records = SqliteRecords(str(tmp_path / "records.sqlite"))
    source = small_image(tmp_path, "disk.qcow2")
    # The first attempt failed for a transient reason; Celery's retry wrote its wait.
    records.create(new_record("retried-bug", source=str(source), task_id="task-1"))
    records.transition(
        "retried-bug", "queued", "saving", attempts=1, reason="retrying in 2 s: x", retry={"attempt": 2, "of": 5}
    )

    def bug(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected bug")

    monkeypatch.setattr(pipeline, "convert_image", bug)
    env = pipeline.Environment(
        records=records,
        store=FileStore(tmp_path / "store"),
        import_config=ImportConfig(allowed_dirs=(str(tmp_path),), staging_dir=str(tmp_path / "staging")),
    )
    record = pipeline.run_import(pipeline.ImportJob("retried-bug", str(source)), env, "task-1", retries_done=1)
    assert record["status"] == "killed" and record["outcome"] == "failed"
    assert record["reason"].startswith("internal error during convert: RuntimeError")
    assert record["retry"] is None


# -- a Redis restart ---------------------------------------------------------------


def wait_running(records: RedisRecords, image_id: str) -> None:
    """Until the job converts or hashes (polled often: it lasts seconds)."""
    deadline = time.monotonic() + RECOVERY_TIMEOUT
    while (progress := records.get_progress(image_id)) is None or progress["stage"] not in ("convert", "checksum"):
        assert time.monotonic() < deadline, f"{image_id} never ran: {records.get(image_id)} {progress}"
        time.sleep(0.05)


def long_image(directory: Path) -> Path:
    """A job that runs for seconds: 1 GiB to hash."""
    path = directory / "long.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x3c 0 16M", str(path)], check=True, capture_output=True)
    return path


@pytest.mark.usefixtures("redis_recovers")
def test_a_redis_restart_is_one_warning_line_per_reconnect_and_loses_nothing(
    app: Any, worker: Worker, setup: Setup, records: RedisRecords, redis_url: str
) -> None:
    source = str(long_image(setup.imports))
    image_id = new_id("restart")
    before = len(worker.text().splitlines())
    running = submit(app, image_id, source)

    wait_running(records, image_id)
    restart_redis(redis_url)  # under a running job
    wait_until(lambda: None if answers_ping(setup.broker, worker.name) else "no answer", "the worker consuming again")
    record = running.get(timeout=RECOVERY_TIMEOUT)
    restart_redis(redis_url)  # under an idle worker
    wait_until(lambda: None if answers_ping(setup.broker, worker.name) else "no answer", "the worker consuming again")
    after = submit(app, new_id("after"), str(small_image(setup.imports, "after.qcow2")))
    assert after.get(timeout=RECOVERY_TIMEOUT)["status"] == "active"

    assert record["status"] == "active" and record["attempts"] == 1
    assert worker.process.poll() is None
    lines = worker.text().splitlines()[before:]
    loud = [line for line in lines if (level := LOG_LEVEL.search(line)) and level.group(1) not in ("DEBUG", "INFO")]
    assert len(loud) == 2 and all("broker connection lost (ConnectionError: " in line for line in loud), "\n".join(
        lines
    )
    assert not [line for line in lines if "Traceback" in line or "Error on restarting" in line], "\n".join(lines)


def test_an_acknowledgement_lost_with_the_connection_is_one_info_line(caplog: pytest.LogCaptureFixture) -> None:
    # A job that ends just as the worker reconnects is acknowledged on the
    # dead connection's channel (seen once in the restart test above; the
    # order of those events cannot be forced from outside). kombu's own
    # Message.ack_log_error logs it, given the worker's logger, here with a
    # channel whose ack fails as a dead Redis connection does.
    import redis
    from kombu.message import Message

    from diskpipe.tasks.worker import _OneLineReconnects

    class DeadChannel:
        no_ack_consumers = None

        def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
            raise redis.exceptions.ConnectionError("Connection closed by server.")

    logger = logging.getLogger("celery.worker.request")
    reconnects = _OneLineReconnects()
    logger.addFilter(reconnects)
    try:
        with caplog.at_level(logging.DEBUG, logger="celery.worker.request"):
            Message(body=b"{}", delivery_tag="d1f0", channel=DeadChannel()).ack_log_error(
                logger, (redis.exceptions.ConnectionError,)
            )
    finally:
        logger.removeFilter(reconnects)
    (record,) = caplog.records
    assert record.levelname == "INFO" and record.exc_info is None
    assert record.getMessage() == (
        "task message 'd1f0' not acknowledged: its broker connection is gone "
        "(ConnectionError: Connection closed by server.); it returns after the visibility timeout"
    )
