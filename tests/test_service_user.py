"""The virtualenv `scripts/setup.sh` makes is usable by a service user.

A worker host runs `celery -A diskpipe.tasks worker` as its own user, not
root: the virtualenv must sit on Debian's /usr/bin/python3 (the interpreter
python3-rados and python3-rbd belong to, readable by everyone, unlike a
pyenv build under /root), be readable by others whatever the umask was,
and hold the `tasks` extra (Celery, redis). Checked with `runuser -u nobody`,
so these tests need root.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RECOVERY_TIMEOUT, ROOT

SAMPLE = "qcow2-v3-c64k"
COPY_IGNORED = shutil.ignore_patterns(
    ".venv", ".git", "build", "dist", "out", "*.egg-info", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"
)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="runs diskpipe as the user nobody with runuser, which needs root"
)


def not_searchable_by_others(path: Path) -> Path | None:
    """The first directory from `path` up that other users cannot enter."""
    for directory in [path, *path.parents]:
        if not directory.stat().st_mode & stat.S_IXOTH:
            return directory
    return None


def world_readable_dir() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="diskpipe-service-user-"))
    directory.chmod(0o755)
    return directory


def as_nobody(*command: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", "nobody", "--", *map(str, command)],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=RECOVERY_TIMEOUT,
    )


@pytest.fixture(scope="module")
def public_sample() -> Iterator[Path]:
    """The demo's qcow2 sample, in a directory everyone may read."""
    directory = world_readable_dir()
    subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), "-m", "samples", str(directory / "samples"), "--only", SAMPLE],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    sample = directory / "samples" / "qcow2" / f"{SAMPLE}.qcow2"
    for path in (directory / "samples", directory / "samples" / "qcow2"):
        path.chmod(0o755)
    sample.chmod(0o644)
    yield sample
    shutil.rmtree(directory)


def assert_info_works(venv: Path, sample: Path) -> None:
    info = as_nobody(venv / "bin" / "python", "-v", venv / "bin" / "diskpipe", "info", sample, cwd=sample.parent)
    assert info.returncode == 0, info.stderr
    assert "format        qcow2" in info.stdout
    assert "safe          yes" in info.stdout
    # Every module comes from a .pyc setup wrote (`python -v` names the .py
    # of one compiled at this start): the service user cannot write them,
    # and compiling diskpipe's modules would triple the command's start.
    compiled = [
        line for line in info.stderr.splitlines() if line.startswith("# code object from") and ".pyc" not in line
    ]
    assert compiled == []


def test_the_checkouts_venv_runs_as_a_service_user(public_sample: Path) -> None:
    blocked = not_searchable_by_others(ROOT)
    if blocked is not None:
        pytest.skip(f"{blocked} is closed to other users (see the README); test_a_fresh_setup_... covers a copy")
    assert_info_works(ROOT / ".venv", public_sample)


def test_a_fresh_setup_makes_a_venv_a_service_user_can_run(public_sample: Path) -> None:
    parent = world_readable_dir()
    try:
        checkout = parent / "diskpipe"
        shutil.copytree(ROOT, checkout, ignore=COPY_IGNORED, symlinks=True)
        # A closed parent first: setup says a service user cannot reach it.
        parent.chmod(0o700)
        setup = subprocess.run(
            # umask 077: the virtualenv's files are made private; setup opens them up.
            ["bash", "-c", "umask 077 && exec bash scripts/setup.sh --no-apt"],
            cwd=checkout,
            capture_output=True,
            text=True,
            check=False,
            timeout=4 * RECOVERY_TIMEOUT,
        )
        assert setup.returncode == 0, setup.stderr[-3000:]
        assert f"{parent} is not searchable by other users" in setup.stderr
        parent.chmod(0o755)

        venv = checkout / ".venv"
        base = subprocess.check_output(
            [venv / "bin" / "python", "-c", "import os, sys; print(os.path.realpath(sys._base_executable))"], text=True
        )
        if not os.environ.get("DISKPIPE_PYTHON"):
            assert base.strip() == os.path.realpath("/usr/bin/python3")
        assert_info_works(venv, public_sample)
        # What a worker imports: the tasks extra and Debian's Ceph bindings.
        imports = as_nobody(venv / "bin" / "python", "-c", "import celery, redis, rados, rbd", cwd=parent)
        assert imports.returncode == 0, imports.stderr
        # The worker's own command loads its app (no broker contacted).
        celery = as_nobody(venv / "bin" / "celery", "-A", "diskpipe.tasks", "report", cwd=parent)
        assert celery.returncode == 0, celery.stderr
        assert "software -> celery" in celery.stdout
    finally:
        parent.chmod(0o755)
        shutil.rmtree(parent)
