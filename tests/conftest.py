"""Shared fixtures: the sample images, and real services (Redis, a one-node
Ceph) started once per test session by the project's own scripts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(ROOT))  # `samples` is a checkout tool, not installed


def _parse_env(output: str) -> dict[str, str]:
    found = {}
    for line in output.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.isupper():
            found[key] = value
    return found


@pytest.fixture(scope="session")
def samples_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every sample image (honest and hostile), made once per session."""
    prebuilt = os.environ.get("DISKPIPE_SAMPLES")
    if prebuilt and (Path(prebuilt) / "manifest.json").exists():
        return Path(prebuilt)
    out = tmp_path_factory.mktemp("samples")
    subprocess.run([sys.executable, "-m", "samples", str(out)], cwd=ROOT, check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="session")
def manifest(samples_dir: Path) -> list[Any]:
    from samples.manifest import load_manifest

    return load_manifest(samples_dir)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that takes `sample_name` runs once per sample recipe."""
    if "sample_name" in metafunc.fixturenames:
        from samples.registry import all_recipes

        metafunc.parametrize("sample_name", [recipe.name for recipe in all_recipes()])


@pytest.fixture
def sample(sample_name: str, manifest: list[Any]) -> Any:
    """The manifest entry of the sample named by `sample_name`."""
    found = next((entry for entry in manifest if entry.name == sample_name), None)
    if found is None:
        pytest.fail(f"sample {sample_name} was not built (see `python -m samples -v`)")
    return found


def qemu_info(path: Path | str, fmt: str) -> dict[str, Any]:
    """The oracle: qemu-img info, taken live, with the format given."""
    result = subprocess.run(
        ["qemu-img", "info", "--output=json", "--force-share", "-f", fmt, str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis (append-only), on a port of its own."""
    state = tmp_path_factory.mktemp("redis")
    env = dict(os.environ, DISKPIPE_REDIS_PORT=os.environ.get("DISKPIPE_TEST_REDIS_PORT", "6390"))
    started = subprocess.run(
        ["bash", str(SCRIPTS / "redis-start.sh"), str(state)], env=env, capture_output=True, text=True, check=False
    )
    if started.returncode != 0:
        pytest.fail(f"redis did not start: {started.stderr}")
    url = _parse_env(started.stdout)["DISKPIPE_BROKER_URL"]
    yield url
    subprocess.run(["bash", str(SCRIPTS / "redis-stop.sh"), str(state)], env=env, capture_output=True, check=False)


class Ceph:
    def __init__(self, state: Path, conf: str, keyring: str | None, env: dict[str, str]) -> None:
        self.state = state
        self.conf = conf
        self.keyring = keyring
        self.env = env

    def pids(self, daemon: str) -> list[int]:
        found = []
        for pidfile in self.state.rglob(f"*{daemon}*.pid"):
            try:
                found.append(int(pidfile.read_text().strip()))
            except ValueError:
                continue
        return found

    def rbd(self, *args: str) -> str:
        return subprocess.run(["rbd", "-c", self.conf, *args], capture_output=True, text=True, check=True).stdout


def _start_ceph(state: Path, port: str, cephx: bool, memstore: int) -> Ceph:
    env = dict(
        os.environ,
        DISKPIPE_CEPH_PORT=port,
        DISKPIPE_CEPH_MEMSTORE_BYTES=str(memstore),
        DISKPIPE_CEPH_CEPHX="1" if cephx else "0",
    )
    started = subprocess.run(
        ["bash", str(SCRIPTS / "ceph-start.sh"), str(state)], env=env, capture_output=True, text=True, check=False
    )
    if started.returncode != 0:
        pytest.fail(f"ceph did not start: {started.stderr[-3000:]}")
    values = _parse_env(started.stdout)
    return Ceph(state, values["CEPH_CONF"], values.get("DISKPIPE_CEPH_KEYRING"), env)


def _stop_ceph(ceph: Ceph) -> None:
    subprocess.run(
        ["bash", str(SCRIPTS / "ceph-stop.sh"), str(ceph.state)], env=ceph.env, capture_output=True, check=False
    )


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ceph]:
    """A real one-node Ceph (memstore, no auth) with an `rbd` pool."""
    if shutil.which("ceph-mon") is None:
        pytest.fail("ceph-mon is not installed: run scripts/setup.sh")
    ceph = _start_ceph(
        tmp_path_factory.mktemp("ceph"), os.environ.get("DISKPIPE_TEST_CEPH_PORT", "6791"), False, 3 << 30
    )
    yield ceph
    _stop_ceph(ceph)


@pytest.fixture(scope="session")
def ceph_cephx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ceph]:
    """A second one-node Ceph with cephx on and a `client.diskpipe` user."""
    ceph = _start_ceph(
        tmp_path_factory.mktemp("ceph-cephx"), os.environ.get("DISKPIPE_TEST_CEPHX_PORT", "6795"), True, 1 << 30
    )
    yield ceph
    _stop_ceph(ceph)


class Rgw:
    """A RADOS Gateway on the session's Ceph, with a test user."""

    def __init__(self, ceph: Ceph, env: dict[str, str], values: dict[str, str]) -> None:
        self.ceph = ceph
        self.env = env
        self.endpoint = values["DISKPIPE_S3_ENDPOINT"]
        self.access_key = values["DISKPIPE_S3_ACCESS_KEY"]
        self.secret_key = values["DISKPIPE_S3_SECRET_KEY"]

    def start(self) -> None:
        """(Re)start the gateway and wait until it answers (the script waits,
        with a generous deadline)."""
        started = subprocess.run(
            ["bash", str(SCRIPTS / "rgw-start.sh"), str(self.ceph.state)],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        if started.returncode != 0:
            pytest.fail(f"radosgw did not start: {started.stderr[-3000:]}")

    def stop(self) -> None:
        subprocess.run(
            ["bash", str(SCRIPTS / "rgw-stop.sh"), str(self.ceph.state)], env=self.env, capture_output=True, check=True
        )

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}, connect_timeout=5),
        )

    def bucket(self) -> str:
        """A new, empty bucket."""
        import uuid

        name = f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def rgw(ceph: Ceph) -> Iterator[Rgw]:
    """Ceph's own S3 gateway (radosgw) on the session's one-node Ceph."""
    if shutil.which("radosgw") is None:
        pytest.fail("radosgw is not installed: run scripts/setup.sh")
    env = dict(ceph.env, DISKPIPE_RGW_PORT=os.environ.get("DISKPIPE_TEST_RGW_PORT", "7481"))
    started = subprocess.run(
        ["bash", str(SCRIPTS / "rgw-start.sh"), str(ceph.state)], env=env, capture_output=True, text=True, check=False
    )
    if started.returncode != 0:
        pytest.fail(f"radosgw did not start: {started.stderr[-3000:]}")
    gateway = Rgw(ceph, env, _parse_env(started.stdout))
    yield gateway
    gateway.stop()
