"""Several worker hosts, for real: three network namespaces on a bridge
(scripts/netns-hosts.sh), each running `celery -A diskpipe.tasks worker`,
with Redis and a one-node Ceph reachable only over the bridge.

A host cut off the network mid-job loses its job to another host once its
lease has expired; its temporary image is fenced (its writers blocklisted)
and removed, and when it comes back it writes nothing more. A host that
cannot reach Redis takes no job until it can again. No job is lost, none
runs to completion twice.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from benchmarks.common import netns_env, netns_hosts
from diskpipe.converter.stores.base import OWNER
from diskpipe.jobs.connection import redis_client
from diskpipe.jobs.records import RedisRecords
from samples import tools
from tests.conftest import (
    FAULT_TEST_TIMEOUT,
    RECOVERY_TIMEOUT,
    ROOT,
    SCRIPTS,
    Ceph,
    _parse_env,
    process_alive,
    wait_until,
)
from tests.test_tasks import reference_md5, stage, wait_final

pytestmark = [
    pytest.mark.timeout(FAULT_TEST_TIMEOUT),
    pytest.mark.skipif(
        shutil.which("ip") is None or os.geteuid() != 0,
        reason="needs `ip netns` (iproute2, run as root) to build the worker hosts",
    ),
]

HOSTS = ("h1", "h2", "h3")
# Short enough for minutes, not hours: a cut-off host's lease expires after
# LEASE_TTL, its unacknowledged job is handed out again VISIBILITY_TIMEOUT
# after its delivery, looked for every REDELIVERY_SWEEP seconds.
LEASE_TTL = 6
VISIBILITY_TIMEOUT = 20
REDELIVERY_SWEEP = 2
# qemu-img writes this many bytes per second (tests/qemu_img_throttled.sh):
# the long job below takes seconds to convert, so a test can act meanwhile.
QEMU_RATE = "8M"
TASK_ENDED = r"Task diskpipe\.import_image\[{task}\] (succeeded|retry|raised|failed)"


class NetnsHosts:
    """scripts/netns-hosts.sh, with names and subnet of this test run."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.prefix = env["DISKPIPE_NETNS_PREFIX"]
        self.values: dict[str, str] = {}

    def run(self, *args: str) -> str:
        return netns_hosts(self.env, *args)

    def up(self) -> None:
        self.values = _parse_env(self.run("up"))

    def down(self) -> None:
        self.run("down")

    def namespace(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def ip(self, host: str) -> str:
        return self.values["DISKPIPE_NETNS_CEPH_ADDR"].rsplit(".", 1)[0] + f".{10 + int(host[1:])}"

    def command(self, host: str, *args: str) -> list[str]:
        return ["bash", str(SCRIPTS / "netns-hosts.sh"), "exec", host, "--", *args]

    def host_of_owner(self, owner: str | None) -> str | None:
        """The host a record's `owner` (`<hostname>-<key>-<pid>`) names."""
        parsed = OWNER.fullmatch(owner or "")
        hostname = parsed["host"] if parsed else ""
        return hostname.removeprefix(f"{self.prefix}-") if hostname.startswith(f"{self.prefix}-") else None

    def processes(self, host: str, name: str) -> list[int]:
        """Processes called `name` inside the host's network namespace."""
        inode = os.stat(f"/run/netns/{self.namespace(host)}").st_ino
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if (entry / "comm").read_text().strip() == name and (entry / "ns/net").stat().st_ino == inode:
                    found.append(int(entry.name))
            except OSError:
                continue
        return found


class HostWorkers:
    """One Celery worker (one process) per host, started inside it."""

    def __init__(self, hosts: NetnsHosts, env: dict[str, str], logs: Path) -> None:
        self.hosts = hosts
        self.env = env
        self.logs = logs
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def log(self, host: str) -> Path:
        return self.logs / f"worker-{host}.log"

    def start(self, host: str) -> None:
        command = self.hosts.command(
            host, sys.executable, "-m", "celery", "-A", "diskpipe.tasks", "worker", "-l", "info", "-c", "1",
            "-n", f"{host}@%h", "--without-mingle", "--without-gossip",
        )  # fmt: skip
        with self.log(host).open("ab") as handle:
            self.processes[host] = subprocess.Popen(
                command, cwd=ROOT, env=self.env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
            )

    def answers_ping(self, host: str) -> str | None:
        """None when the worker takes control messages through Redis (so it
        is consuming), else why not."""
        from celery import Celery

        process = self.processes.get(host)
        if process is None or process.poll() is not None:
            raise AssertionError(f"worker {host} is not running:\n{self.log(host).read_text()[-3000:]}")
        client = Celery(broker=self.env["DISKPIPE_BROKER_URL"])
        try:
            node = f"{host}@{self.hosts.namespace(host)}"
            return None if client.control.ping(destination=[node], timeout=3) else f"no answer from {node}"
        except Exception as error:  # noqa: BLE001 - any broker trouble means "not yet"
            return f"ping failed: {error}"
        finally:
            client.close()

    def ensure_running(self, restart: bool = False) -> None:
        for host in HOSTS:
            process = self.processes.get(host)
            if process is not None and (restart or process.poll() is not None):
                self.stop(host)
            if host not in self.processes:
                self.start(host)
        for host in HOSTS:
            wait_until(lambda host=host: self.answers_ping(host), f"worker {host} consuming")

    def stop(self, host: str) -> None:
        process = self.processes.pop(host)
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        except ProcessLookupError:
            process.wait()
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop_all(self) -> None:
        for host in list(self.processes):
            self.stop(host)


@dataclass
class Cluster:
    hosts: NetnsHosts
    workers: HostWorkers
    ceph: Ceph
    broker: str
    records: RedisRecords
    imports: Path

    def submit(self, source: str) -> tuple[str, str]:
        """Send an import job; returns (image id, task id)."""
        from celery import Celery

        image_id = f"mh-{uuid.uuid4().hex[:10]}"
        client = Celery(broker=self.broker)
        try:
            result = client.send_task(
                "diskpipe.import_image", kwargs={"image_id": image_id, "source": source}, queue="diskpipe"
            )
        finally:
            client.close()
        return image_id, str(result.id)

    def host_of(self, record: dict[str, Any]) -> str | None:
        return self.hosts.host_of_owner(record.get("owner"))

    def temporaries(self, image_id: str) -> list[str]:
        return [name for name in self.ceph.rbd("ls").split() if name.startswith(f"{image_id}.tmp.")]

    def blocked_brpop_from(self, host: str) -> str | None:
        """None when Redis holds no blocked BRPOP of a worker on `host`: a
        job pushed now cannot be popped for it (a pop whose reply never
        arrives would lose the job, see the report)."""
        import redis

        clients = redis.Redis.from_url(self.broker, socket_timeout=10).client_list()
        blocked = [c for c in clients if c["addr"].startswith(f"{self.hosts.ip(host)}:") and "b" in c["flags"]]
        return f"{len(blocked)} blocked BRPOP of {host}" if blocked else None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("multihost")
    imports = base / "imports"
    imports.mkdir()
    # The bridge addresses are not loopback: the session's Redis and Ceph on
    # 127.0.0.1 may use the same ports (DISKPIPE_TEST_REDIS_PORT, ..._CEPH_PORT).
    timeout = os.environ.get("DISKPIPE_CEPH_TIMEOUT", str(int(RECOVERY_TIMEOUT)))
    env = netns_env("DISKPIPE_TEST_", base / "services", ("dpt", "10.213.0.0/24", 6390, 6791), 2 << 30, timeout)
    hosts = NetnsHosts(env)
    try:
        hosts.up()
    except RuntimeError as error:
        hosts.down()
        pytest.fail(str(error))
    broker = hosts.values["DISKPIPE_BROKER_URL"]
    config = base / "diskpipe.toml"
    config.write_text(
        f"""
[store]
kind = "rbd"
[rbd]
conf = "{hosts.values["CEPH_CONF"]}"
connect_timeout = 5
# A cut-off writer's Ceph ops wait out the cut instead of timing out: when
# its host returns, they reach the OSDs, which must refuse them (fencing).
op_timeout = {int(RECOVERY_TIMEOUT)}
[import]
allowed_dirs = ["{imports}"]
staging_dir = "{base / "staging"}"
"""
    )
    worker_env = dict(
        env,  # netns-hosts.sh runs each worker inside its host
        DISKPIPE_CONFIG=str(config),
        DISKPIPE_BROKER_URL=broker,
        DISKPIPE_CELERY_LEASE_TTL=str(LEASE_TTL),
        DISKPIPE_CELERY_VISIBILITY_TIMEOUT=str(VISIBILITY_TIMEOUT),
        DISKPIPE_CELERY_REDELIVERY_SWEEP=str(REDELIVERY_SWEEP),
        DISKPIPE_CELERY_RETRY_BACKOFF_MAX="2",
        DISKPIPE_QEMU_IMG=str(ROOT / "tests" / "qemu_img_throttled.sh"),
        DISKPIPE_TEST_QEMU_RATE=QEMU_RATE,
        PYTHONUNBUFFERED="1",
    )
    ceph_env = dict(env, DISKPIPE_CEPH_ADDR=hosts.values["DISKPIPE_NETNS_CEPH_ADDR"])
    ceph = Ceph(Path(hosts.values["DISKPIPE_NETNS_CEPH_DIR"]), hosts.values["CEPH_CONF"], None, ceph_env)
    workers = HostWorkers(hosts, worker_env, base)
    try:
        workers.ensure_running()
        yield Cluster(hosts, workers, ceph, broker, RedisRecords(redis_client(broker)), imports)
    finally:
        workers.stop_all()
        hosts.down()


@pytest.fixture
def healed(cluster: Cluster) -> Iterator[Cluster]:
    """Whatever the test cut or paused, the next one gets every host linked
    and reaching Redis, Ceph serving I/O and all three workers consuming."""
    yield cluster
    for host in HOSTS:
        cluster.hosts.run("restore", host)
        for pid in cluster.hosts.processes(host, "qemu-img"):
            os.kill(pid, signal.SIGCONT)
    generation = cluster.ceph.generation
    cluster.ceph.ensure_healthy()
    cluster.workers.ensure_running(restart=cluster.ceph.generation != generation)


def long_source(cluster: Cluster, tmp_path: Path) -> str:
    """A qcow2 whose conversion takes seconds at QEMU_RATE (96 MiB of data)."""
    path = tmp_path / "long.qcow2"
    tools.create(path, "qcow2", 1 << 30)
    tools.write(path, "qcow2", [(0, 64 << 20, 0x3C), (512 << 20, 32 << 20, 0x5A)])
    return stage(cluster.imports, path)


def small_source(cluster: Cluster, tmp_path: Path) -> str:
    path = tmp_path / "small.qcow2"
    tools.create(path, "qcow2", 64 << 20)
    tools.write(path, "qcow2", [(0, 2 << 20, 0x11)])
    return stage(cluster.imports, path)


def _converting(pid: int) -> bool:
    """A `qemu-img convert` (not the short `qemu-img info` of a cross-check,
    which may be gone by the time the test signals it)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return b"\0convert\0" in handle.read()
    except OSError:
        return False


def _writer_on(cluster: Cluster, image_id: str) -> tuple[str, int, str] | None:
    """(host, qemu-img pid, temporary image) once a host's qemu-img is
    writing the job's temporary image (it holds the image's lock)."""
    record = cluster.records.get(image_id)
    host = cluster.host_of(record or {})
    if record is None or record["status"] != "saving" or host is None:
        return None
    pids = [pid for pid in cluster.hosts.processes(host, "qemu-img") if _converting(pid)]
    try:
        names = [name for name in cluster.temporaries(image_id) if name.endswith(record["owner"])]
        if not pids or not names:
            return None
        lockers = json.loads(cluster.ceph.rbd("lock", "ls", "--format", "json", f"rbd/{names[0]}") or "[]")
    except subprocess.CalledProcessError:  # a CLI losing a race on a busy machine: ask again
        return None
    if not any(locker["address"].startswith(f"{cluster.hosts.ip(host)}:") for locker in lockers):
        return None
    return host, pids[0], names[0]


def _wait_writer(cluster: Cluster, image_id: str, attempts: int) -> tuple[str, int, str]:
    found: list[tuple[str, int, str]] = []

    def writing() -> str | None:
        record = cluster.records.get(image_id) or {}
        if record.get("attempts") != attempts:
            return f"record at attempt {record.get('attempts')}: {record}"
        writer = _writer_on(cluster, image_id)
        if writer is None:
            return f"no qemu-img of attempt {attempts} writing yet: {record.get('owner')}, {cluster.records.get_progress(image_id)}"
        found.append(writer)
        return None

    wait_until(writing, f"attempt {attempts} of {image_id} writing its temporary image")
    return found[-1]


def _data_objects(cluster: Cluster, temporary: str) -> tuple[str, str]:
    info = json.loads(cluster.ceph.rbd("info", "--format", "json", f"rbd/{temporary}"))
    data_prefix = info["block_name_prefix"]
    return data_prefix, "rbd_header." + data_prefix.removeprefix("rbd_data.")


def _ceph(cluster: Cluster, *args: str) -> str:
    """The output of a `ceph` command, tried again while it fails (a CLI
    starting on a busy machine can lose the race for the monitor map)."""
    output: list[str] = []

    def answered() -> str | None:
        done = cluster.ceph._tool("ceph", *args)
        if isinstance(done, str) or done.returncode != 0:
            return done if isinstance(done, str) else done.stderr[-500:]
        output.append(done.stdout)
        return None

    wait_until(answered, f"`ceph {' '.join(args)}` answering")
    return output[-1]


def _objects_with(cluster: Cluster, prefixes: tuple[str, ...]) -> list[str]:
    listed = subprocess.run(
        ["rados", "-c", cluster.ceph.conf, "-p", "rbd", "ls"], capture_output=True, text=True, check=True
    ).stdout.split()
    return [name for name in listed if name.startswith(prefixes)]


def test_a_host_cut_off_mid_job_is_fenced_and_its_job_taken_over(healed: Cluster, tmp_path: Path) -> None:
    cluster = healed
    source = long_source(cluster, tmp_path)
    image_id, task = cluster.submit(source)
    first, first_qemu, first_tmp = _wait_writer(cluster, image_id, attempts=1)
    prefixes = _data_objects(cluster, first_tmp)

    # The first host goes dark while its qemu-img is mid-write (paused for
    # the moment of the cut, so it is mid-write for sure).
    os.kill(first_qemu, signal.SIGSTOP)
    cluster.hosts.run("cut", first)
    os.kill(first_qemu, signal.SIGCONT)

    # Its lease expires, the job comes back from Redis, another host takes
    # it over: it fences and removes the first host's temporary image.
    second, second_qemu, _ = _wait_writer(cluster, image_id, attempts=2)
    assert second != first
    os.kill(second_qemu, signal.SIGSTOP)  # the takeover stays unfinished while the first host returns
    try:
        assert first_tmp not in cluster.temporaries(image_id)
        assert f"{cluster.hosts.ip(first)}:0/" in _ceph(cluster, "osd", "blocklist", "ls")

        # The first host comes back. Its attempt ends without writing: not
        # the record (still the second attempt's, saving), not the store.
        cluster.hosts.run("restore", first)
        ended = re.compile(TASK_ENDED.format(task=re.escape(task)))
        log = cluster.workers.log(first)
        wait_until(
            lambda: None if ended.search(log.read_text()) else "still running",
            f"the cut-off attempt on {first} ending",
        )
        record = cluster.records.get(image_id)
        assert record is not None
        assert (record["status"], record["attempts"], cluster.host_of(record)) == ("saving", 2, second), record
        assert "lost its lease and writes nothing more" in log.read_text()
    finally:
        os.kill(second_qemu, signal.SIGCONT)

    final = wait_final(cluster.records, image_id)
    assert final["status"] == "active", final
    assert final["attempts"] == 2 and cluster.host_of(final) == second
    assert final["checksum"] == reference_md5(Path(source), "qcow2", tmp_path)
    names = cluster.ceph.rbd("ls").split()
    assert names.count(image_id) == 1 and not cluster.temporaries(image_id)
    # Nothing of the first host's temporary survived, nor was written again.
    assert _objects_with(cluster, prefixes) == []
    assert process_alive(cluster.workers.processes[first].pid)


def test_a_host_that_cannot_reach_redis_takes_no_job_until_it_can(healed: Cluster, tmp_path: Path) -> None:
    cluster = healed
    source = small_source(cluster, tmp_path)
    away, others = "h3", ("h1", "h2")

    cluster.hosts.run("cut-redis", away)
    wait_until(lambda: cluster.blocked_brpop_from(away), f"Redis no longer waiting on {away}")
    jobs = [cluster.submit(source)[0] for _ in range(4)]
    finals = [wait_final(cluster.records, image_id) for image_id in jobs]
    assert [record["status"] for record in finals] == ["active"] * len(jobs), finals
    assert {cluster.host_of(record) for record in finals} <= set(others)
    assert all(record["attempts"] == 1 for record in finals)
    # It waits for Redis (silently, blocked in a broker call); it does not die.
    assert cluster.workers.processes[away].poll() is None

    # Back in reach, it takes jobs again: the only host that can, now.
    cluster.hosts.run("restore-redis", away)
    wait_until(lambda: cluster.workers.answers_ping(away), f"worker {away} consuming again")
    for host in others:
        cluster.hosts.run("cut-redis", host)
    for host in others:
        wait_until(lambda host=host: cluster.blocked_brpop_from(host), f"Redis no longer waiting on {host}")
    image_id, _ = cluster.submit(source)
    final = wait_final(cluster.records, image_id)
    assert final["status"] == "active" and final["attempts"] == 1, final
    assert cluster.host_of(final) == away
    names = cluster.ceph.rbd("ls").split()
    assert all(names.count(job) == 1 for job in [*jobs, image_id])
