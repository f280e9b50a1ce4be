"""Shared fixtures: the sample images, and real services (Redis, a one-node
Ceph) started once per test session by the project's own scripts."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(ROOT))  # `samples` is a checkout tool, not installed

# How long a fault test waits for a service to come back (Ceph answering I/O,
# Redis answering PING, a worker answering ping) before it gives up or
# rebuilds. Generous on purpose: on a busy machine recovery takes minutes,
# and a condition wait returns as soon as the service is back anyway.
RECOVERY_TIMEOUT = float(os.environ.get("DISKPIPE_TEST_RECOVERY_TIMEOUT", "600"))
# pytest-timeout for a fault test: above the waits it can make in a row (for
# the job under the fault, for recovery in the test and again in the
# finalizer, for a rebuild's start-up) plus the test's own work.
FAULT_TEST_TIMEOUT = int(5 * RECOVERY_TIMEOUT + 600)


def wait_until(
    condition: Callable[[], str | None], what: str, timeout: float = RECOVERY_TIMEOUT, interval: float = 1
) -> None:
    """Poll `condition` (None: satisfied, else what is still wrong) every
    `interval` seconds until it holds; fail with the last complaint after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        problem = condition()
        if problem is None:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout:.0f}s: {problem}")
        time.sleep(interval)


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@pytest.fixture
def ctrl_c_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt in the main thread during the test, as
    Ctrl-C does at a prompt, whoever started the suite. A background job of a
    non-interactive shell (`pytest ... &` in a script or CI step) inherits
    SIGINT ignored, and Python keeps SIG_IGN: a test that sends itself SIGINT
    would then see nothing happen."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def qemu_img_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The arguments of every qemu-img run through diskpipe's qemu_img.run
    in this test (it still runs them)."""
    from diskpipe.converter import qemu_img

    calls: list[list[str]] = []
    real_run = qemu_img.run

    def recording_run(args: Any, *rest: Any, **options: Any) -> str:
        calls.append(list(args))
        return real_run(args, *rest, **options)

    monkeypatch.setattr(qemu_img, "run", recording_run)
    return calls


def qemu_img_children(parent: int | None = None) -> list[int]:
    """The running `qemu-img convert` children of `parent` (default: this
    test process). Only our own: on a shared machine other qemu-img runs are
    none of a test's business, to kill or to count."""
    parent = os.getpid() if parent is None else parent
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm, _, rest = (entry / "stat").read_text().rpartition(")")
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        state, ppid = rest.split()[:2]
        if comm.endswith("(qemu-img") and state != "Z" and int(ppid) == parent and b"convert" in cmdline:
            found.append(int(entry.name))
    return found


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
    built = subprocess.run(
        [sys.executable, "-m", "samples", str(out)], cwd=ROOT, check=False, capture_output=True, text=True
    )
    if built.returncode != 0:  # say which recipe failed, not only the exit status
        pytest.fail(f"python -m samples failed:\n{built.stdout[-3000:]}\n{built.stderr[-3000:]}")
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


def redis_problem(url: str) -> str | None:
    """What keeps the Redis at `url` from answering PING (None: it answers)."""
    import redis

    try:
        redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10).ping()
    except redis.RedisError as error:
        return f"no PONG: {error}"
    return None


def redis_config_file(url: str) -> Path:
    """The redis.conf of the running Redis (redis-start.sh keeps it in the
    data dir), to start the same instance again after a restart."""
    import redis

    return Path(redis.Redis.from_url(url).config_get("dir")["dir"]) / "redis.conf"


def restart_redis(url: str) -> None:
    """SHUTDOWN the tests' Redis (append-only: jobs and records survive) and
    start the same instance again from its own redis.conf."""
    import redis

    plain = redis.Redis.from_url(url)  # no automatic retries around SHUTDOWN
    old_pid = int(plain.info("server")["process_id"])
    config_file = redis_config_file(url)
    with contextlib.suppress(redis.ConnectionError):
        plain.shutdown()
    # The old server must be gone (its port free) before the new one binds.
    wait_until(lambda: f"redis-server {old_pid} still running" if process_alive(old_pid) else None, "Redis down")
    subprocess.run(["redis-server", str(config_file)], check=True, capture_output=True)
    wait_until(lambda: redis_problem(url), "Redis answering after the restart")


def ensure_redis(url: str, config_file: Path) -> None:
    """Start the Redis again from its own config (append-only: jobs and
    records survive) if a test left it down, and wait for PING."""
    if redis_problem(url) is not None:
        subprocess.run(["redis-server", str(config_file)], check=False, capture_output=True)
    wait_until(lambda: redis_problem(url), f"Redis at {url} answering")


@pytest.fixture
def redis_recovers(redis_url: str) -> Iterator[None]:
    """For tests that stop Redis: the next test gets it answering again."""
    config_file = redis_config_file(redis_url)
    yield
    ensure_redis(redis_url, config_file)


class CephDown(AssertionError):
    """A daemon of the test cluster has exited."""


class Ceph:
    def __init__(self, state: Path, conf: str, keyring: str | None, env: dict[str, str]) -> None:
        self.state = state
        self.conf = conf
        self.keyring = keyring
        self.env = env
        # Bumped when the cluster was rebuilt from scratch: whoever caches a
        # connection to it (Celery workers) must reconnect.
        self.generation = 0

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

    def _tool(self, *args: str) -> subprocess.CompletedProcess[str] | str:
        """One ceph/rados call with client-side timeouts, and a hard one
        around it (a CLI starting on a busy machine may itself take seconds)."""
        if args[0] == "ceph":
            timeouts = ["--connect-timeout", "30"]
        else:
            timeouts = ["--client_mount_timeout", "30", "--rados_mon_op_timeout", "30", "--rados_osd_op_timeout", "30"]
        try:
            return subprocess.run(
                [args[0], "-c", self.conf, *timeouts, *args[1:]],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return f"`{' '.join(args)}` hung for 120 s"

    def dead_daemon(self) -> str | None:
        """A daemon that has exited: nothing here restarts it, so waiting for
        the cluster to come back is pointless."""
        for daemon in ("mon", "osd"):
            pids = self.pids(daemon)
            if not pids or not all(process_alive(pid) for pid in pids):
                return f"ceph-{daemon} is not running (pid files: {pids})"
        return None

    def problem(self) -> str | None:
        """What keeps the cluster from serving a client now (None: it does):
        every daemon running, the OSD up and in, and a small object written,
        read back and removed in the pool."""
        dead = self.dead_daemon()
        if dead is not None:
            raise CephDown(dead)
        dump = self._tool("ceph", "osd", "dump", "--format", "json")
        if isinstance(dump, str) or dump.returncode != 0:
            return f"the monitor does not answer: {dump if isinstance(dump, str) else dump.stderr[-500:]}"
        osds = json.loads(dump.stdout)["osds"]
        if not osds or not all(osd["up"] and osd["in"] for osd in osds):
            return f"OSDs not up and in: {[(osd['osd'], osd['up'], osd['in']) for osd in osds]}"
        payload = self.state / "health-probe"
        payload.write_bytes(os.urandom(4096))
        for step in (("put", str(payload)), ("stat",), ("rm",)):
            done = self._tool("rados", "-p", "rbd", step[0], ".diskpipe-health-probe", *step[1:])
            if isinstance(done, str) or done.returncode != 0:
                return f"rados {step[0]} failed: {done if isinstance(done, str) else done.stderr[-500:]}"
        return None

    def resume(self) -> None:
        """SIGCONT every daemon: a fault test may have stopped one."""
        for pid in self.pids("mon") + self.pids("osd"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def ops_waiting_for_readable(self) -> int:
        """Client ops the OSDs hold back as "waiting for readable" (PG laggy).

        Ceph 16 can leave a PG of a one-replica pool laggy for good after the
        OSD was paused: if a client op reaches the PG after SIGCONT before its
        read lease is renewed, the PG turns laggy, and only a lease ack from a
        replica (there is none) rechecks it; the lease renewals that follow do
        not. A quiet machine renews first; a busy one often loses that race."""
        waiting = 0
        for admin_socket in (self.state / "run").glob("osd.*.asok"):
            try:
                dump = subprocess.run(
                    ["ceph", "--admin-daemon", str(admin_socket), "dump_ops_in_flight"],
                    capture_output=True,
                    text=True,
                    timeout=120,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                continue
            if dump.returncode == 0:
                ops = json.loads(dump.stdout).get("ops", [])
                waiting += sum(op.get("type_data", {}).get("flag_point") == "waiting for readable" for op in ops)
        return waiting

    def repeer(self) -> str:
        """Mark the OSDs down: each sees it was wrongly marked down and boots
        again, and its PGs peer afresh, no longer laggy (no data is lost; the
        mon command works without a mgr, unlike `ceph pg repeer`)."""
        ids = [path.name.split(".")[1] for path in (self.state / "run").glob("osd.*.pid")]
        done = self._tool("ceph", "osd", "down", *ids)
        return done if isinstance(done, str) else (done.stdout + done.stderr).strip()

    def wait_healthy(self, timeout: float = RECOVERY_TIMEOUT) -> None:
        """Wait until a client can use the cluster; CephDown at once if a
        daemon has died, AssertionError after `timeout` seconds. PGs stuck
        laggy (see ops_waiting_for_readable) are made to peer again, once:
        the OSD shuts itself down after 5 mark-downs in 10 minutes."""
        repeered = False

        def condition() -> str | None:
            nonlocal repeered
            problem = self.problem()
            # The probe has already waited out its op timeout (30 s), well past
            # the lease renewal (every 8 s) that ends a laggy state that is not stuck.
            if problem is not None and not repeered and self.ops_waiting_for_readable():
                repeered = True
                warnings.warn(f"Ceph PGs stuck laggy ({problem}), peering again: {self.repeer()}", stacklevel=2)
                return problem
            return problem

        wait_until(condition, f"Ceph ({self.state}) serving I/O", timeout)

    def ensure_healthy(self, timeout: float = RECOVERY_TIMEOUT) -> None:
        """Hand the cluster on healthy: resume paused daemons and wait for
        I/O; if it does not come back in time, rebuild it (empty) in place,
        same port and paths, so later tests never inherit a dead cluster."""
        self.resume()
        try:
            self.wait_healthy(timeout)
        except AssertionError as error:
            warnings.warn(f"rebuilding the test Ceph cluster: {error}", stacklevel=2)
            rebuilt = _start_ceph(self.state, self.env)
            self.conf, self.keyring = rebuilt.conf, rebuilt.keyring
            self.generation += 1


@pytest.fixture
def ceph_recovers(ceph: Ceph) -> Iterator[Ceph]:
    """The session cluster, handed on to the next test serving I/O whatever
    this test did to it (see Ceph.ensure_healthy)."""
    yield ceph
    ceph.ensure_healthy()


def _start_ceph_script(state: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPTS / "ceph-start.sh"), str(state)], env=env, capture_output=True, text=True, check=False
    )


def _start_ceph(state: Path, env: dict[str, str]) -> Ceph:
    """ceph-start.sh; one more try if the first fails (it leaves a failed
    cluster running for debugging, and a busy machine can fail a start that a
    second attempt passes; the script stops the first one itself)."""
    started = _start_ceph_script(state, env)
    if started.returncode != 0:
        started = _start_ceph_script(state, env)
    if started.returncode != 0:
        subprocess.run(["bash", str(SCRIPTS / "ceph-stop.sh"), str(state)], env=env, capture_output=True, check=False)
        pytest.fail(f"ceph did not start: {started.stderr[-3000:]}")
    values = _parse_env(started.stdout)
    return Ceph(state, values["CEPH_CONF"], values.get("DISKPIPE_CEPH_KEYRING"), env)


def _ceph_env(port: str, cephx: bool, memstore: int) -> dict[str, str]:
    return dict(
        os.environ,
        DISKPIPE_CEPH_PORT=port,
        DISKPIPE_CEPH_MEMSTORE_BYTES=str(memstore),
        DISKPIPE_CEPH_CEPHX="1" if cephx else "0",
        # Start-up on a busy machine takes longer than the script's 60 s default.
        DISKPIPE_CEPH_TIMEOUT=os.environ.get("DISKPIPE_CEPH_TIMEOUT", str(int(RECOVERY_TIMEOUT))),
    )


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
        tmp_path_factory.mktemp("ceph"), _ceph_env(os.environ.get("DISKPIPE_TEST_CEPH_PORT", "6791"), False, 3 << 30)
    )
    yield ceph
    _stop_ceph(ceph)


@pytest.fixture(scope="session")
def ceph_cephx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ceph]:
    """A second one-node Ceph with cephx on and a `client.diskpipe` user."""
    ceph = _start_ceph(
        tmp_path_factory.mktemp("ceph-cephx"),
        _ceph_env(os.environ.get("DISKPIPE_TEST_CEPHX_PORT", "6795"), True, 1 << 30),
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
        # Once more from scratch: a busy machine can make the first start fail.
        subprocess.run(
            ["bash", str(SCRIPTS / "rgw-stop.sh"), str(ceph.state)], env=env, capture_output=True, check=False
        )
        started = subprocess.run(
            ["bash", str(SCRIPTS / "rgw-start.sh"), str(ceph.state)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
    if started.returncode != 0:
        pytest.fail(f"radosgw did not start: {started.stderr[-3000:]}")
    gateway = Rgw(ceph, env, _parse_env(started.stdout))
    yield gateway
    gateway.stop()
