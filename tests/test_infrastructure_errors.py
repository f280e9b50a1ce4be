"""A setup mistake or a broken store is not a bad image.

Each Ceph setup mistake (a missing or unusable ceph.conf, a missing keyring, a
user Ceph does not know) has its own one-line message naming the file or the
user, never "pool does not exist"; an unwritable store directory, a full disk
and an unreachable cluster are infrastructure errors. `diskpipe convert` and
`diskpipe import` exit 2 with the message; an import's record ends `killed`
with outcome `failed`, and never says "refused"; nothing is left in the store
or the staging directory. Real parts: the cephx test cluster, a read-only and
a tiny tmpfs, qemu-img, the command line in its own process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from diskpipe.jobs.records import SqliteRecords
from tests.conftest import ROOT, Ceph


def run_diskpipe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diskpipe", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )


def cli_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """The embedded mode (no broker, no config file), records and staging in
    `tmp_path`, plus `settings` as DISKPIPE_* variables."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("DISKPIPE_")}
    env.update(
        DISKPIPE_STORE_RECORDS=str(tmp_path / "records.sqlite"),
        DISKPIPE_IMPORT_STAGING_DIR=str(tmp_path / "staging"),
        **settings,
    )
    return env


def listing(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir()) if directory.is_dir() else []


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("diskpipe: "), stderr
    return lines[0]


def assert_failed_record(tmp_path: Path, image_id: str, reason_start: str) -> dict[str, Any]:
    record = SqliteRecords(str(tmp_path / "records.sqlite")).get(image_id)
    assert record is not None
    assert (record["status"], record["outcome"]) == ("killed", "failed"), record
    assert record["reason"].startswith(reason_start), record["reason"]
    assert "refused" not in record["reason"], record["reason"]
    return record


@pytest.fixture(scope="module")
def qcow2_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images") / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", str(path)], check=True, capture_output=True)
    return path


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Any]:
    """Mounts small tmpfs filesystems under tmp_path and removes them after."""
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], check=False, capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", str(point)], check=False)


# -- Ceph setup mistakes ---------------------------------------------------------

# (case, [rbd] settings built from the cluster and tmp_path, pool, what the message must say)
SETUP_MISTAKES = [
    ("missing-conf", lambda c, t: {"CONF": str(t / "nowhere" / "ceph.conf")}, "rbd", "ceph.conf does not exist"),
    ("conf-is-a-directory", lambda c, t: {"CONF": str(t)}, "rbd", "is not a regular file"),
    ("garbage-conf", lambda c, t: {"CONF": str(t / "garbage.conf")}, "rbd", "garbage.conf cannot be parsed"),
    ("missing-keyring", lambda c, t: {"KEYRING": str(t / "gone.keyring")}, "rbd", "gone.keyring does not exist"),
    ("user-not-in-keyring", lambda c, t: {"USER": "nobody"}, "rbd", "holds no key for Ceph user client.nobody"),
    (
        "user-unknown-to-ceph",
        lambda c, t: {"USER": "intruder", "KEYRING": str(t / "intruder.keyring")},
        "rbd",
        "Ceph rejected user client.intruder",
    ),
    ("missing-pool", lambda c, t: {}, "nopool", "RBD pool 'nopool' does not exist"),
]


@pytest.mark.parametrize(
    ("settings", "pool", "message"),
    [pytest.param(settings, pool, message, id=case) for case, settings, pool, message in SETUP_MISTAKES],
)
def test_each_ceph_setup_mistake_has_its_own_message_and_exit_2(
    tmp_path: Path, ceph_cephx: Ceph, qcow2_image: Path, settings: Any, pool: str, message: str
) -> None:
    (tmp_path / "garbage.conf").write_text("this is [not\n a conf")
    (tmp_path / "intruder.keyring").write_text("[client.intruder]\n\tkey = AQBYdWVmAAAAABAAsT0xxJj1k1ZCWzgTqk7Q+g==\n")
    rbd = {"CONF": ceph_cephx.conf, "USER": "diskpipe", "KEYRING": str(ceph_cephx.keyring), "CONNECT_TIMEOUT": "10"}
    rbd.update(settings(ceph_cephx, tmp_path))
    env = cli_env(tmp_path, **{f"DISKPIPE_RBD_{key}": value for key, value in rbd.items()})
    before = ceph_cephx.rbd("ls").split()

    converted = run_diskpipe(env, "convert", str(qcow2_image), "--store", f"rbd:{pool}", "--id", "c1", "--quiet")
    assert converted.returncode == 2, converted.stderr
    line = one_line(converted.stderr)
    assert message in line
    if pool == "rbd":
        assert "pool" not in line

    imported = run_diskpipe(env, "import", str(qcow2_image), "--store", f"rbd:{pool}", "--id", "i1", "--quiet")
    assert imported.returncode == 2, imported.stdout + imported.stderr
    assert message in one_line(imported.stderr)
    assert message in assert_failed_record(tmp_path, "i1", "setup error: ")["reason"]
    assert ceph_cephx.rbd("ls").split() == before
    assert listing(tmp_path / "staging") == []


def test_an_unreachable_cluster_is_an_infrastructure_error_not_a_refusal(tmp_path: Path, qcow2_image: Path) -> None:
    conf = tmp_path / "down.conf"
    conf.write_text("[global]\nmon host = 127.0.0.1:1\nauth_client_required = none\n")
    env = cli_env(tmp_path, DISKPIPE_RBD_CONF=str(conf), DISKPIPE_RBD_CONNECT_TIMEOUT="3")

    converted = run_diskpipe(env, "convert", str(qcow2_image), "--store", "rbd:rbd", "--quiet")
    assert converted.returncode == 2
    assert "Ceph is unreachable" in one_line(converted.stderr)

    imported = run_diskpipe(env, "import", str(qcow2_image), "--store", "rbd:rbd", "--id", "down", "--quiet")
    assert imported.returncode == 2
    assert "Ceph is unreachable" in one_line(imported.stderr)
    # No retry happened in process, so none is claimed.
    record = assert_failed_record(tmp_path, "down", "unavailable: ")
    assert "gave up" not in record["reason"]
    assert listing(tmp_path / "staging") == []


# -- the file store --------------------------------------------------------------


def test_an_unwritable_store_directory_is_a_setup_error(tmp_path: Path, qcow2_image: Path, tmpfs: Any) -> None:
    read_only = tmpfs("read-only", "ro,size=1m")
    env = cli_env(tmp_path)

    converted = run_diskpipe(env, "convert", str(qcow2_image), "--store", f"file:{read_only}", "--quiet")
    assert converted.returncode == 2
    line = one_line(converted.stderr)
    assert f"file store {read_only}" in line and "Read-only file system" in line

    imported = run_diskpipe(env, "import", str(qcow2_image), "--store", f"file:{read_only}", "--id", "ro", "--quiet")
    assert imported.returncode == 2
    assert f"file store {read_only}" in one_line(imported.stderr)
    assert_failed_record(tmp_path, "ro", "setup error: file store ")
    assert listing(read_only) == []


def test_a_full_disk_is_an_infrastructure_error_and_leaves_nothing(tmp_path: Path, tmpfs: Any) -> None:
    small = tmpfs("small", "size=8m")
    raw = tmp_path / "big.raw"
    raw.write_bytes(os.urandom(32 << 20))
    source = tmp_path / "big.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(source)], check=True)
    raw.unlink()
    env = cli_env(tmp_path)

    converted = run_diskpipe(env, "convert", str(source), "--store", f"file:{small}", "--quiet")
    assert converted.returncode == 2
    line = one_line(converted.stderr)
    assert "writing into the file store failed" in line and "No space left on device" in line
    assert listing(small) == []

    imported = run_diskpipe(env, "import", str(source), "--store", f"file:{small}", "--id", "full", "--quiet")
    assert imported.returncode == 2
    assert "No space left on device" in one_line(imported.stderr)
    record = assert_failed_record(tmp_path, "full", "unavailable: writing into the file store failed")
    assert "gave up" not in record["reason"]
    assert listing(small) == []
    assert listing(tmp_path / "staging") == []
