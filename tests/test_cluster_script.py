"""`scripts/cluster.sh`, the README's third command, run as a user runs it:
`up` starts Redis, a one-node Ceph and Celery workers and imports a sample
through the broker into RBD; `status` sees every part; `down` leaves no
process and no state directory behind.

The cluster gets ports of its own, next to the suite's Redis and Ceph
(`DISKPIPE_TEST_CLUSTER_REDIS_PORT`, `DISKPIPE_TEST_CLUSTER_CEPH_PORT`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FAULT_TEST_TIMEOUT, RECOVERY_TIMEOUT, ROOT, process_alive

pytestmark = [pytest.mark.slow, pytest.mark.timeout(FAULT_TEST_TIMEOUT)]

SCRIPT = ROOT / "scripts" / "cluster.sh"
VENV_BIN = ROOT / ".venv" / "bin"
REDIS_PORT = os.environ.get(
    "DISKPIPE_TEST_CLUSTER_REDIS_PORT", str(int(os.environ.get("DISKPIPE_TEST_REDIS_PORT", "6390")) + 1)
)
CEPH_PORT = os.environ.get(
    "DISKPIPE_TEST_CLUSTER_CEPH_PORT", str(int(os.environ.get("DISKPIPE_TEST_CEPH_PORT", "6791")) + 2)
)


def cluster_env() -> dict[str, str]:
    return dict(
        os.environ,
        DISKPIPE_REDIS_PORT=REDIS_PORT,
        DISKPIPE_CEPH_PORT=CEPH_PORT,
        DISKPIPE_CEPH_MEMSTORE_BYTES=str(1 << 30),
        # Every step waits on a condition up to this long (a busy machine).
        DISKPIPE_CLUSTER_TIMEOUT=str(int(RECOVERY_TIMEOUT)),
        DISKPIPE_CLUSTER_STOP_TIMEOUT="60",
    )


def cluster(command: str, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), command, "--dir", str(state), *args],
        env=cluster_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=4 * RECOVERY_TIMEOUT,
    )


def read_pid(path: Path) -> int:
    return int(path.read_text().strip())


def processes_in_group(pgid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    """The cluster's state directory; whatever happens, `down` runs."""
    directory = tmp_path / "cluster"
    yield directory
    cluster("down", directory)


def test_up_imports_into_rbd_and_down_leaves_nothing(state: Path) -> None:
    up = cluster("up", state, "--no-setup", "--workers", "2")
    assert up.returncode == 0, f"up failed:\n{up.stdout}\n{up.stderr}"

    # The import went through the broker to a worker and ended active in RBD.
    match = re.search(r"import (cluster-sample-\d+): active", up.stdout)
    assert match, up.stdout
    image_id = match.group(1)
    env = dict(line.split("=", 1) for line in (state / "env").read_text().splitlines())
    status = subprocess.run(
        [str(VENV_BIN / "diskpipe"), "status", image_id, "--output", "json", "--broker", env["DISKPIPE_BROKER_URL"]],
        capture_output=True,
        text=True,
        check=True,
    )
    record = json.loads(status.stdout)
    assert record["status"] == "active"
    assert record["disk_format"] == "raw"
    assert record["virtual_size"] == 64 << 20
    assert record["locations"][0]["url"].endswith(f"/rbd/{image_id}/snap")
    rbd = ["rbd", "--conf", env["CEPH_CONF"]]
    info = json.loads(subprocess.check_output([*rbd, "info", "--format", "json", f"rbd/{image_id}"], text=True))
    assert info["size"] == 64 << 20
    snapshots = json.loads(subprocess.check_output([*rbd, "snap", "ls", "--format", "json", f"rbd/{image_id}"]))
    assert [snapshot["name"] for snapshot in snapshots] == ["snap"]
    worker_logs = "".join(log.read_text() for log in sorted((state / "workers").glob("w*.log")))
    assert re.search(r"Task diskpipe\.import_image\[[^]]+\] succeeded", worker_logs), worker_logs[-3000:]

    # `env` points diskpipe on this host at the cluster: a second import
    # goes to the workers and into RBD (not into a local file store).
    shutil.copy(state / "imports" / "sample.qcow2", state / "imports" / "second.qcow2")
    admin = subprocess.run(
        [
            "bash",
            "-c",
            'eval "$(bash "$0" env --dir "$1")" && "$2" import "$1/imports/second.qcow2" --id second --quiet '
            '&& "$2" list',
            str(SCRIPT),
            str(state),
            str(VENV_BIN / "diskpipe"),
        ],
        env=dict(cluster_env(), XDG_DATA_HOME=str(state.parent / "data")),
        capture_output=True,
        text=True,
        check=False,
        timeout=RECOVERY_TIMEOUT,
    )
    assert admin.returncode == 0, admin.stdout + admin.stderr
    assert re.search(r"locations? +rbd://[^ ]+/rbd/second/snap", admin.stdout), admin.stdout
    assert image_id in admin.stdout

    status_run = cluster("status", state)
    assert status_run.returncode == 0, status_run.stdout + status_run.stderr
    assert status_run.stdout.count("worker   up") == 2, status_run.stdout
    assert image_id in status_run.stdout

    # A second `up` on a live cluster refuses and leaves it running.
    again = cluster("up", state, "--no-setup")
    assert again.returncode != 0
    assert "already lives" in again.stderr
    assert (state / "env").exists()

    workers = [read_pid(path) for path in sorted((state / "workers").glob("w*.pid"))]
    assert len(workers) == 2
    children = [pid for worker in workers for pid in processes_in_group(worker) if pid != worker]
    assert children, "each worker runs pool processes in its own session"
    daemons = [read_pid(state / "redis" / "redis.pid")]
    daemons += [read_pid(path) for path in (state / "ceph" / "run").glob("*.pid")]
    assert len(daemons) == 3  # redis, ceph-mon, ceph-osd
    assert all(process_alive(pid) for pid in workers + children + daemons)

    down = cluster("down", state)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not state.exists()
    assert [pid for pid in workers + children + daemons if process_alive(pid)] == []
    assert [pid for worker in workers for pid in processes_in_group(worker)] == []

    # Idempotent: nothing left to stop is no error, and status says so.
    assert cluster("down", state).returncode == 0
    assert cluster("status", state).returncode == 3
