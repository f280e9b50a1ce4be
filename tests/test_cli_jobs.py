"""The job commands (`import`, `list`, `status`, ...) run as a user runs
them: exit codes, one-line messages, what is (and is not) left in the
records, against the embedded SQLite records, a real Redis, and a closed
port where a broker should be."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ROOT

CLI_TIMEOUT = 60  # generous: a hung command fails the test instead of the session
# Lets a root test process lose root's right to read any file (so a mode-000
# file is unreadable, as it is for an ordinary user).
WITHOUT_READ_OVERRIDE = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]

Run = Callable[..., subprocess.CompletedProcess[str]]


def run_cli(env: dict[str, str], *args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "diskpipe", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def base_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"), DISKPIPE_IMPORT_STAGING_DIR=str(tmp_path / "st"))
    for name in ("DISKPIPE_BROKER_URL", "CELERY_BROKER_URL", "DISKPIPE_CONFIG", "DISKPIPE_IMPORT_ALLOWED_DIRS"):
        env.pop(name, None)
    return env


@pytest.fixture
def embedded(tmp_path: Path) -> Run:
    """The CLI with no broker: file store and SQLite records under tmp_path."""
    env = base_env(tmp_path)
    return lambda *args, **kwargs: run_cli(env, *args, **kwargs)


def make_qcow2(path: Path, size: str = "64M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def bad_local_paths(tmp_path: Path) -> dict[str, tuple[Path, tuple[str, ...], str]]:
    """name -> (path, command prefix, what the message says)."""
    directory = tmp_path / "a-directory"
    directory.mkdir()
    fifo = tmp_path / "a-fifo"
    os.mkfifo(fifo)
    unreadable = make_qcow2(tmp_path / "unreadable.qcow2")
    unreadable.chmod(0)
    prefix = tuple(WITHOUT_READ_OVERRIDE) if os.geteuid() == 0 else ()
    return {
        "missing": (tmp_path / "missing.qcow2", (), "No such file or directory"),
        "directory": (directory, (), "not a regular file"),
        "fifo": (fifo, (), "not a regular file"),
        "unreadable": (unreadable, prefix, "Permission denied"),
    }


def test_an_embedded_import_of_a_bad_local_path_is_exit_2_and_leaves_no_record(embedded: Run, tmp_path: Path) -> None:
    for name, (path, prefix, said) in bad_local_paths(tmp_path).items():
        result = embedded("import", str(path), "--id", name, prefix=prefix)
        assert result.returncode == 2, (name, result.stdout, result.stderr)
        line = one_line(result.stderr)
        assert line.startswith("diskpipe: cannot import: ") and said in line and str(path) in line, (name, line)
        assert result.stdout == ""
    listed = embedded("list", "--output=json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []
    assert not (tmp_path / "data" / "diskpipe" / "images").exists() or not any(
        (tmp_path / "data" / "diskpipe" / "images").iterdir()
    )


def test_an_embedded_import_takes_any_readable_file_and_records_a_uuid_task_id(embedded: Run, tmp_path: Path) -> None:
    """Without a broker no import directory applies (the operator's own
    file); the attempt is a plain UUID."""
    source = make_qcow2(tmp_path / "elsewhere.qcow2")
    done = embedded("import", str(source), "--id", "mine", "--output=json", "--quiet")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["status"] == "active"
    assert str(uuid.UUID(record["task_id"])) == record["task_id"]


def test_list_shows_names_and_human_sizes_and_json_keeps_bytes(embedded: Run, tmp_path: Path) -> None:
    # Exactly 1 GiB, the smallest size shown in GiB (a larger one only costs
    # the import seconds of hashing zeros).
    source = make_qcow2(tmp_path / "named.qcow2", "1G")
    name = "debian\x1b[31m-12"  # a control character must not reach the terminal
    done = embedded("import", str(source), "--id", "named", "--name", name, "--quiet")
    assert done.returncode == 0, done.stderr
    lines = embedded("list").stdout.splitlines()
    assert lines[0].split() == ["ID", "NAME", "STATUS", "OUTCOME", "FORMAT", "VIRTUAL", "SIZE", "UPDATED"]
    row = lines[1]
    assert row.split()[:5] == ["named", "debian\\x1b[31m-12", "active", "active", "raw"]
    assert "1.0 GiB" in row and "\x1b" not in row
    listed = json.loads(embedded("list", "--output=json").stdout)
    assert listed[0]["virtual_size"] == 1024**3 and listed[0]["name"] == name


def test_status_shows_every_field_of_the_record(embedded: Run, tmp_path: Path) -> None:
    source = make_qcow2(tmp_path / "status.qcow2")
    assert embedded("import", str(source), "--id", "st", "--quiet").returncode == 0
    record = json.loads(embedded("status", "st", "--output=json").stdout)
    human = embedded("status", "st")
    assert human.returncode == 0, human.stderr
    labels = [line.split()[0] for line in human.stdout.splitlines()]
    # Every key of the record, and its progress, has a row.
    assert sorted(labels) == sorted({*record, "progress"})
    for key in ("outcome", "retry", "attempts", "progress", "task_id", "source_format"):
        assert key in labels, key
    rows = {line.split()[0]: line.split(None, 1)[1] for line in human.stdout.splitlines()}
    assert rows["outcome"] == "active" and rows["attempts"] == "1" and rows["retry"] == "-"
    assert rows["virtual_size"] == "64.0 MiB (67108864 bytes)"
    assert rows["progress"].startswith("done 100.0%")
    assert embedded("status", "nothing-here").returncode == 2


# -- with a broker -------------------------------------------------------------


@pytest.fixture
def broker_env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    """A broker of its own (Redis database 9 of the session's Redis) and a
    queue no worker reads: a job sent here is looked at, never run."""
    env = base_env(tmp_path)
    imports = tmp_path / "imports"
    imports.mkdir()
    env.update(
        DISKPIPE_BROKER_URL=redis_url.rsplit("/", 1)[0] + "/9",
        DISKPIPE_CELERY_QUEUE=f"cli-test-{uuid.uuid4().hex[:8]}",
        DISKPIPE_IMPORT_ALLOWED_DIRS=str(imports),
    )
    return env


def test_with_a_broker_a_local_path_is_checked_by_the_workers_rules_before_anything_is_queued(
    broker_env: dict[str, str], tmp_path: Path
) -> None:
    import redis

    imports = Path(broker_env["DISKPIPE_IMPORT_ALLOWED_DIRS"])
    outside = make_qcow2(tmp_path / "outside.qcow2")
    linked = imports / "linked.qcow2"
    os.link(outside, linked)
    (imports / "sub").mkdir()
    cases = {
        "outside": (outside, "outside the import directories"),
        "missing": (imports / "missing.qcow2", "No such file or directory"),
        "hard-link": (linked, "hard links"),
        "directory": (imports / "sub", "not a regular file"),
    }
    for name, (path, said) in cases.items():
        result = run_cli(broker_env, "import", str(path), "--id", name)
        assert result.returncode == 2, (name, result.stdout, result.stderr)
        assert said in one_line(result.stderr), name
    disabled = dict(broker_env)
    disabled.pop("DISKPIPE_IMPORT_ALLOWED_DIRS")
    refused = run_cli(disabled, "import", str(outside), "--id", "disabled")
    assert refused.returncode == 2 and "no [import] allowed_dirs" in one_line(refused.stderr)
    recorded = {record["id"] for record in json.loads(run_cli(broker_env, "list", "--output=json").stdout)}
    assert recorded.isdisjoint({*cases, "disabled"})
    client = redis.Redis.from_url(broker_env["DISKPIPE_BROKER_URL"])
    assert client.llen(broker_env["DISKPIPE_CELERY_QUEUE"]) == 0  # nothing was sent either


def test_with_a_broker_the_task_id_is_a_plain_uuid_and_the_record_names_it(
    broker_env: dict[str, str], tmp_path: Path
) -> None:
    import redis

    imports = Path(broker_env["DISKPIPE_IMPORT_ALLOWED_DIRS"])
    make_qcow2(imports / "ok.qcow2")
    sent = run_cli(broker_env, "import", str(imports / "ok.qcow2"), "--id", "queued-1", "--no-wait")
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.strip() == "queued-1"
    record = json.loads(run_cli(broker_env, "status", "queued-1", "--output=json").stdout)
    assert record["status"] == "queued"
    task_id = record["task_id"]
    assert str(uuid.UUID(task_id)) == task_id and uuid.UUID(task_id).version == 4
    client = redis.Redis.from_url(broker_env["DISKPIPE_BROKER_URL"])
    messages = [json.loads(raw) for raw in client.lrange(broker_env["DISKPIPE_CELERY_QUEUE"], 0, -1)]
    assert [message["headers"]["id"] for message in messages] == [task_id]
    assert [message["headers"]["task"] for message in messages] == ["diskpipe.import_image"]


def test_with_a_broker_store_and_policy_options_are_a_usage_error(broker_env: dict[str, str], tmp_path: Path) -> None:
    imports = Path(broker_env["DISKPIPE_IMPORT_ALLOWED_DIRS"])
    make_qcow2(imports / "ok.qcow2")
    for option in (["--store", f"file:{tmp_path}"], ["--policy", str(tmp_path / "policy.toml")]):
        result = run_cli(broker_env, "import", str(imports / "ok.qcow2"), "--id", "opt", *option)
        assert result.returncode == 2
        line = one_line(result.stderr)
        assert f"{option[0]} cannot be used with a broker" in line and "workers" in line
    deleted = run_cli(broker_env, "delete", "whatever", "--store", f"file:{tmp_path}")
    assert deleted.returncode == 2 and "--store cannot be used with a broker" in one_line(deleted.stderr)
    assert run_cli(broker_env, "status", "opt").returncode == 2  # no such image: nothing was recorded


def test_an_unreachable_broker_fails_within_seconds_with_one_line_naming_it(tmp_path: Path) -> None:
    """A closed port where the broker should be: every command that needs
    it returns (no minutes of retries), exit 2, one line naming the broker
    without its password; an import leaves nothing behind."""
    port = closed_port()
    env = base_env(tmp_path)
    imports = tmp_path / "imports"
    imports.mkdir()
    make_qcow2(imports / "ok.qcow2")
    env.update(DISKPIPE_BROKER_URL=f"redis://:s3cret@127.0.0.1:{port}/0", DISKPIPE_IMPORT_ALLOWED_DIRS=str(imports))
    commands = {
        "import": ["import", str(imports / "ok.qcow2")],
        "list": ["list"],
        "status": ["status", "x"],
        "cancel": ["cancel", "x"],
        "delete": ["delete", "x"],
        "protect": ["protect", "x"],
    }
    took = {}
    for name, args in commands.items():
        started = time.monotonic()
        result = run_cli(env, *args)  # returns within CLI_TIMEOUT or the test fails
        took[name] = round(time.monotonic() - started, 1)
        assert result.returncode == 2, (name, result.stdout, result.stderr)
        line = one_line(result.stderr)
        assert f"broker redis://:***@127.0.0.1:{port}/0 is unreachable" in line, (name, line)
        assert "s3cret" not in result.stderr
    print(f"seconds per command against a closed broker port: {took}")


def test_an_unreachable_result_backend_is_named_and_nothing_is_recorded(broker_env: dict[str, str]) -> None:
    imports = Path(broker_env["DISKPIPE_IMPORT_ALLOWED_DIRS"])
    make_qcow2(imports / "ok.qcow2")
    port = closed_port()
    env = dict(broker_env, DISKPIPE_CELERY_RESULT_BACKEND=f"redis://127.0.0.1:{port}/0")
    started = time.monotonic()
    result = run_cli(env, "import", str(imports / "ok.qcow2"), "--id", "unsent")
    print(f"seconds against a closed result backend port: {time.monotonic() - started:.1f}")
    assert result.returncode == 2
    assert f"result backend redis://127.0.0.1:{port}/0 is unreachable" in one_line(result.stderr)
    assert run_cli(broker_env, "status", "unsent").returncode == 2  # no such image


def test_a_silent_broker_fails_within_seconds_too(tmp_path: Path) -> None:
    """A listener that accepts and never answers (a hung Redis, a wrong
    service): the command gives up after its probe's timeout instead of the
    tens of seconds a working client's timeouts and retries would add up to."""
    env = base_env(tmp_path)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        env["DISKPIPE_BROKER_URL"] = f"redis://127.0.0.1:{port}/0"
        started = time.monotonic()
        result = run_cli(env, "list")
        print(f"seconds against a silent broker: {time.monotonic() - started:.1f}")
    assert result.returncode == 2
    assert f"broker redis://127.0.0.1:{port}/0 is unreachable" in one_line(result.stderr)
