"""`diskpipe cleanup` names each leftover it removes, and each it cannot
remove with the reason (exit 2 then, the others are removed anyway); with
`--broker` the workers run their own cleanup task and report the same way.

Real parts: leftovers made as a dead writer leaves them (its pid gone), an
immutable file (chattr +i) and an RBD temporary with a clone as the ones that
cannot go, the session's Ceph and Redis, a Celery worker process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from diskpipe.converter.stores.base import OWNER, Leftover, owner_alive, owner_tag
from tests.conftest import ROOT, Ceph, wait_until


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), cwd=ROOT, env=env, capture_output=True, text=True, check=False)


def run_diskpipe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "diskpipe", *args, env=env)


def cli_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("DISKPIPE_")}
    env.update(
        DISKPIPE_STORE_RECORDS=str(tmp_path / "records.sqlite"),
        DISKPIPE_IMPORT_STAGING_DIR=str(tmp_path / "staging"),
        **settings,
    )
    return env


def host_of(tag: str) -> str:
    parsed = OWNER.fullmatch(tag)
    assert parsed is not None, tag
    return parsed["host"]


def this_host() -> str:
    return host_of(owner_tag())


def dead_owner(where: str | None = None) -> str:
    """An owner tag (host-key-pid) of a process of this host that has exited;
    `where` instead of this process's host-key."""
    process = subprocess.Popen(["true"])
    process.wait()
    return f"{where or owner_tag().rpartition('-')[0]}-{process.pid}"


@pytest.fixture
def immutable(tmp_path: Path) -> Iterator[list[Path]]:
    """Files made immutable (chattr +i) by the test; made mutable again after."""
    made: list[Path] = []
    yield made
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], check=False)


def test_file_store_cleanup_names_what_it_removes_and_what_it_cannot(tmp_path: Path, immutable: list[Path]) -> None:
    store = tmp_path / "store"
    store.mkdir()
    owner = dead_owner()
    removable = store / f".img-a.tmp.{owner}"
    stuck = store / f".img-b.tmp.{owner}"
    live = store / f".img-c.tmp.{owner_tag()}"
    for path in (removable, stuck, live):
        path.write_bytes(b"\0" * 4096)
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True, check=False).returncode != 0:
        pytest.skip("chattr +i is not possible here")
    immutable.append(stuck)
    env = cli_env(tmp_path)

    done = run_diskpipe(env, "cleanup", "--store", f"file:{store}")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout.splitlines() == [f"removed store {removable.name}"]
    assert done.stderr.splitlines() == [
        f"diskpipe: could not remove store {stuck.name}: Operation not permitted in {store}"
    ]
    assert sorted(entry.name for entry in store.iterdir()) == sorted([stuck.name, live.name])

    again = run_diskpipe(env, "cleanup", "--store", f"file:{store}", "--output", "json")
    assert again.returncode == 2
    report = json.loads(again.stdout)
    assert report["store"] == [{"name": stuck.name, "removed": False, "why": f"Operation not permitted in {store}"}]

    subprocess.run(["chattr", "-i", str(stuck)], check=True)
    last = run_diskpipe(env, "cleanup", "--store", f"file:{store}")
    assert (last.returncode, last.stdout.strip(), last.stderr) == (0, f"removed store {stuck.name}", "")
    assert run_diskpipe(env, "cleanup", "--store", f"file:{store}").stdout.strip() == "nothing to remove"


def test_rbd_cleanup_names_a_temporary_it_cannot_remove_and_removes_the_rest(tmp_path: Path, ceph: Ceph) -> None:
    owner = dead_owner()
    tag = uuid.uuid4().hex[:8]
    removable, cloned, clone = f"gone-{tag}.tmp.{owner}", f"kept-{tag}.tmp.{owner}", f"clone-{tag}"
    for name in (removable, cloned):
        ceph.rbd("create", "--size", "4M", name)
    ceph.rbd("snap", "create", f"{cloned}@s")
    ceph.rbd("snap", "protect", f"{cloned}@s")
    ceph.rbd("clone", f"{cloned}@s", clone)
    env = cli_env(tmp_path, DISKPIPE_RBD_CONF=ceph.conf)
    try:
        done = run_diskpipe(env, "cleanup", "--store", "rbd:rbd")
        assert done.returncode == 2, done.stdout + done.stderr
        assert f"removed store {removable}" in done.stdout.splitlines()
        kept = [line for line in done.stderr.splitlines() if cloned in line]
        assert kept == [
            f"diskpipe: could not remove store {cloned}: image {cloned} is in use: its snapshot has clones; "
            "flatten or remove the clones first"
        ]
        names = ceph.rbd("ls").split()
        assert removable not in names and cloned in names
    finally:
        ceph.rbd("rm", clone)
        ceph.rbd("snap", "unprotect", f"{cloned}@s")
    # The clone gone, the next pass removes the temporary.
    last = run_diskpipe(env, "cleanup", "--store", "rbd:rbd")
    assert last.returncode == 0, last.stderr
    assert f"removed store {cloned}" in last.stdout.splitlines()
    assert cloned not in ceph.rbd("ls").split()


def test_cleanup_with_a_broker_runs_the_workers_cleanup_task(tmp_path: Path, redis_url: str) -> None:
    from tests.test_tasks import Workers

    queue = f"cleanup-{uuid.uuid4().hex[:8]}"  # only this test's worker consumes it
    store = tmp_path / "worker-store"
    config = tmp_path / "worker.toml"
    config.write_text(
        f'[store]\nkind = "file"\ndirectory = "{store}"\nrecords = "{tmp_path / "unused.sqlite"}"\n'
        f'[import]\nstaging_dir = "{tmp_path / "worker-staging"}"\n[celery]\nqueue = "{queue}"\n'
    )
    # No worker on a queue: a clear message within the timeout, not a hang.
    nobody = run_diskpipe(
        cli_env(tmp_path, DISKPIPE_CELERY_QUEUE=f"{queue}-nobody"), "cleanup", "--broker", redis_url, "--timeout", "3"
    )
    assert nobody.returncode == 2
    assert nobody.stderr.strip() == "diskpipe: no worker answered within 3 s; is one running?"
    # No broker there at all: one line, and no password in it.
    down = run_diskpipe(cli_env(tmp_path), "cleanup", "--broker", "redis://:secret@127.0.0.1:1/0", "--timeout", "3")
    assert down.returncode == 2
    line = down.stderr.strip()
    assert line.startswith("diskpipe: broker redis://:***@127.0.0.1:1/0 is unreachable:") and "\n" not in line

    workers = Workers(config, redis_url, tmp_path)
    workers.start("cleaner", concurrency=1)
    try:
        log = tmp_path / "cleaner.log"
        wait_until(lambda: None if "startup cleanup" in log.read_text() else "not yet", "the start-up cleanup")
        store.mkdir(exist_ok=True)
        leftover = store / f".img-w.tmp.{dead_owner()}"
        leftover.write_bytes(b"\0" * 4096)
        env = cli_env(tmp_path, DISKPIPE_CELERY_QUEUE=queue)
        done = run_diskpipe(env, "cleanup", "--broker", redis_url, "--timeout", "120", "--output", "json")
        human = run_diskpipe(env, "cleanup", "--broker", redis_url, "--timeout", "120")
    finally:
        workers.stop_all()
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout) == {"store": [{"name": leftover.name, "removed": True}], "staging": []}
    assert not leftover.exists()
    assert (human.returncode, human.stdout.strip()) == (0, "nothing to remove")


def test_rbd_cleanup_judges_another_hosts_temporary_by_the_images_creation_time(ceph: Ceph) -> None:
    """Whether another host's writer lives cannot be seen from here: its
    temporary goes once older than `stale_after`, counted from the image's
    own creation time (no metadata of ours needed, so one made by any tool
    or an older diskpipe is judged alike)."""
    from diskpipe.converter.stores.rbd import RbdConfig, RbdStore

    name = f"far-{uuid.uuid4().hex[:8]}.tmp.otherhost-4242"
    ceph.rbd("create", "--size", "4M", name)
    patient = RbdStore(RbdConfig(conf=ceph.conf, stale_after=3600))
    try:
        assert all(leftover.name != name for leftover in patient.cleanup())
        assert name in ceph.rbd("ls").split()
    finally:
        patient.close()
    eager = RbdStore(RbdConfig(conf=ceph.conf, stale_after=0))
    try:
        assert [leftover for leftover in eager.cleanup() if leftover.name == name] == [Leftover(name, True)]
    finally:
        eager.close()
    assert name not in ceph.rbd("ls").split()


def owner_tag_in_a_new_pid_namespace() -> str:
    """owner_tag() as a process in a pid namespace of its own computes it
    (a container on this host: same host name, its own pids)."""
    code = "from diskpipe.converter.stores.base import owner_tag; print(owner_tag())"
    done = run("unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code)
    if done.returncode != 0:
        pytest.skip(f"cannot make a pid namespace here (unshare, needs root): {done.stderr.strip()}")
    return done.stdout.strip()


def test_a_writer_in_another_pid_namespace_is_not_judged_by_a_pid_seen_from_here(tmp_path: Path) -> None:
    """Same host name, a pid that is dead *here*: in its own pid namespace
    (a container) the writer may well live, so its temporary is not removed
    (before, host name and pid were the whole owner tag, and cleanup removed
    a live container's image); one of this namespace with that dead pid is."""
    contained = owner_tag_in_a_new_pid_namespace()
    here = owner_tag()
    assert host_of(contained) == host_of(here), "same host name"
    contained_where = contained.rpartition("-")[0]
    assert contained_where != here.rpartition("-")[0], "the namespace key tells them apart"
    store = tmp_path / "store"
    store.mkdir()
    theirs = store / f".img-a.tmp.{dead_owner(contained_where)}"
    ours = store / f".img-b.tmp.{dead_owner()}"
    for path in (theirs, ours):
        path.write_bytes(b"\0" * 512)

    done = run_diskpipe(cli_env(tmp_path), "cleanup", "--store", f"file:{store}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [f"removed store {ours.name}"]
    assert theirs.exists()


@pytest.mark.parametrize(
    "tag",
    [
        "otherhost-4242",  # an older diskpipe's host-pid of another host
        "host-0123456-42",  # not a key of eight hex digits
        f"{owner_tag().rpartition('-')[0]}-0",  # pid 0 would be our own process group
        f"{owner_tag().rpartition('-')[0]}-99999999999",  # past any pid (os.kill would overflow)
        f"{this_host()}-{os.getpid()}0000000",  # an older diskpipe's, of this host, past any pid
        ".tmp.",
        "",
    ],
)
def test_an_owner_tag_in_no_form_we_write_is_judged_by_age_not_by_a_pid(tag: str) -> None:
    assert owner_alive(tag) is None


def test_this_process_is_alive_and_a_dead_one_of_this_namespace_is_not() -> None:
    assert owner_alive(owner_tag()) is True
    assert owner_alive(dead_owner()) is False
    # The host name is for people (it may change at run time): the key decides.
    assert owner_alive(f"renamed-{owner_tag().split('-', 1)[1]}") is True


def test_an_older_diskpipes_live_writer_of_this_host_is_kept_and_a_dead_ones_judged_by_age() -> None:
    """During an upgrade an older diskpipe (tags `host-pid`) may still be
    writing: its pid, alive here, keeps its temporary; a dead one's is no
    longer judged by a pid that may be another namespace's, but by age."""
    host = this_host()
    assert owner_alive(f"{host}-{os.getpid()}") is True
    assert owner_alive(f"{host}-{dead_owner().rpartition('-')[2]}") is None


def test_file_store_cleanup_judges_a_writer_it_cannot_ask_by_the_files_last_write(tmp_path: Path) -> None:
    """A temporary left by a writer on another host or from before a reboot
    (its key is not ours), or in a form no diskpipe writes now: kept while
    fresh, removed once its last write is older than a day (before, a file
    store kept such leftovers for ever)."""
    store = tmp_path / "store"
    store.mkdir()
    names = [f".img-{n}.tmp.{tag}" for n, tag in enumerate(["rebooted-0badcafe-1234", "oldhost-77", "x"])]
    day = 24 * 3600
    for name in names:
        (store / name).write_bytes(b"\0" * 512)
    fresh, old = names[:1], names[1:]
    for name in old:
        os.utime(store / name, (time.time() - day - 60,) * 2)
    outsider = store / ".not-an-id!.tmp.oldhost-77"  # not a temporary of a valid id: not ours
    outsider.write_bytes(b"")
    os.utime(outsider, (time.time() - day - 60,) * 2)

    done = run_diskpipe(cli_env(tmp_path), "cleanup", "--store", f"file:{store}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(done.stdout.splitlines()) == sorted(f"removed store {name}" for name in old)
    assert sorted(entry.name for entry in store.iterdir()) == sorted([*fresh, outsider.name])
