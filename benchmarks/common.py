"""Shared pieces of the benchmarks: repeated timings reported as a median
with the spread, the machine and versions, result files, and a throw-away
one-node Ceph with a memstore big enough for benchmark images."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "work"


@dataclass(frozen=True)
class Timing:
    """Repeated wall-clock measurements of one thing."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.samples), max(self.samples)

    def text(self, unit: str = "s") -> str:
        low, high = self.spread
        return f"{self.median:.3f} {unit} ({low:.3f}–{high:.3f}, n={len(self.samples)})"

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.spread[0], "max": self.spread[1], "samples": list(self.samples)}


def measure(function: Callable[[], Any], repeat: int, *, before: Callable[[], Any] | None = None) -> Timing:
    samples = []
    for _ in range(repeat):
        if before is not None:
            before()
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return Timing(tuple(samples))


def interleaved(
    functions: dict[str, Callable[[], Any]], repeat: int, before: Callable[[], Any] | None = None
) -> dict[str, Timing]:
    """Time several candidates in turns (a, b, c, a, b, c...) so a noisy
    moment on the shared machine hits all of them alike."""
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeat):
        for name, function in functions.items():
            if before is not None:
                before()
            started = time.perf_counter()
            function()
            samples[name].append(time.perf_counter() - started)
    return {name: Timing(tuple(values)) for name, values in samples.items()}


def _command_version(args: list[str]) -> str:
    try:
        output = subprocess.run(args, capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        return "not installed"
    return output.strip().splitlines()[0] if output.strip() else "?"


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError):
        memory = 0
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory / (1 << 30), 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "qemu_img": _command_version(["qemu-img", "--version"]),
        "ceph": _command_version(["ceph", "--version"]),
        "diskpipe_commit": commit,
    }


def machine_markdown(info: dict[str, Any]) -> str:
    return (
        f"{info['date']} · {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB · "
        f"Linux {info['kernel']} · Python {info['python']} · {info['qemu_img']} · {info['ceph']} · "
        f"diskpipe {info['diskpipe_commit']}"
    )


def report_head(title: str, info: dict[str, Any]) -> list[str]:
    """The first lines of every results page: its title and the machine it ran on."""
    return [f"# {title}", "", machine_markdown(info), ""]


def timing_cell(timing: dict[str, Any]) -> str:
    """A Timing's JSON as a table cell: median (min–max), seconds."""
    return f"{timing['median']:.2f} s ({timing['min']:.2f}–{timing['max']:.2f})"


Cell = Callable[[dict[str, Any]], str]


def timing_of(key: str, group: str = "timings") -> Cell:
    """A table cell: the entry's timing `key` (entry[group][key])."""
    return lambda entry: timing_cell(entry[group][key])


def ratio_of(key: str, *, bold: bool = True) -> Cell:
    """A table cell: the entry's ratio `key`, as 1.23× (in bold for a headline ratio)."""

    def cell(entry: dict[str, Any]) -> str:
        text = f"{entry.get(key, float('nan')):.2f}×"
        return f"**{text}**" if bold else text

    return cell


def table_rows(entries: dict[str, dict[str, Any]], cells: Sequence[Cell]) -> list[str]:
    """One markdown table row per entry: its name, then each cell."""
    return [f"| {name} | " + " | ".join(cell(entry) for cell in cells) + " |" for name, entry in entries.items()]


def write_results(name: str, markdown: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    path = RESULTS / f"{name}.md"
    path.write_text(markdown)
    return path


@dataclass
class BenchCeph:
    conf: str
    state: Path
    env: dict[str, str]

    def rbd(self, *args: str) -> str:
        return subprocess.run(["rbd", "-c", self.conf, *args], capture_output=True, text=True, check=True).stdout


def netns_env(
    overrides: str, state: Path, defaults: tuple[str, str, int, int], memstore_bytes: int, ceph_timeout: str
) -> dict[str, str]:
    """The environment of scripts/netns-hosts.sh: `defaults` are the namespace
    prefix, the bridge subnet, Redis's and Ceph's ports; each can be overridden
    by the variable OVERRIDES + NETNS_PREFIX, NETNS_SUBNET, REDIS_PORT, CEPH_PORT."""
    prefix, subnet, redis_port, ceph_port = defaults
    return dict(
        os.environ,
        DISKPIPE_NETNS_PREFIX=os.environ.get(f"{overrides}NETNS_PREFIX", prefix),
        DISKPIPE_NETNS_SUBNET=os.environ.get(f"{overrides}NETNS_SUBNET", subnet),
        DISKPIPE_NETNS_STATE=str(state),
        DISKPIPE_REDIS_PORT=os.environ.get(f"{overrides}REDIS_PORT", str(redis_port)),
        DISKPIPE_CEPH_PORT=os.environ.get(f"{overrides}CEPH_PORT", str(ceph_port)),
        DISKPIPE_CEPH_MEMSTORE_BYTES=str(memstore_bytes),
        DISKPIPE_CEPH_TIMEOUT=ceph_timeout,
    )


def netns_hosts(env: dict[str, str], *args: str) -> str:
    """Run scripts/netns-hosts.sh ARGS (up, down, exec HOST -- ...) with `env`
    (its prefix, subnet, ports); its stdout, or RuntimeError with its stderr."""
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "netns-hosts.sh"), *args], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"netns-hosts.sh {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


@contextmanager
def script_service(name: str, state: Path, env: dict[str, str], announces: str) -> Iterator[str]:
    """Run scripts/NAME-start.sh STATE for the length of the block and stop it
    with NAME-stop.sh; yields the value of the `ANNOUNCES=` line it prints."""
    started = subprocess.run(
        ["bash", str(ROOT / "scripts" / f"{name}-start.sh"), str(state)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if started.returncode != 0:
        raise RuntimeError(f"{name} did not start:\n{started.stderr[-2000:]}")
    prefix = f"{announces}="
    value = next(line.removeprefix(prefix) for line in started.stdout.splitlines() if line.startswith(prefix))
    try:
        yield value
    finally:
        subprocess.run(
            ["bash", str(ROOT / "scripts" / f"{name}-stop.sh"), str(state)], env=env, capture_output=True, check=False
        )


@contextmanager
def ceph_cluster(memstore_bytes: int = 10 << 30, port: int = 6797) -> Iterator[BenchCeph]:
    """A one-node Ceph for a benchmark run (memstore takes about twice the
    data written in RAM: give it room and delete images as you go)."""
    state = WORK / f"ceph-{port}"
    env = dict(os.environ, DISKPIPE_CEPH_PORT=str(port), DISKPIPE_CEPH_MEMSTORE_BYTES=str(memstore_bytes))
    with script_service("ceph", state, env, "CEPH_CONF") as conf:
        yield BenchCeph(conf, state, env)


# A pool snapshot (create or remove) is a monitor proposal, and the monitor
# batches proposals: one within paxos_propose_interval (1 s) of the last
# commit waits for the rest of it. Emptying the pool right before a timed run
# would thus slow the run's own snapshot by up to a second — an artefact of
# the benchmark, not of the candidate — so the cluster gets this long to settle.
SETTLE_SECONDS = 1.5


def empty_pool(ceph: BenchCeph) -> None:
    """Remove every image with its snapshots (outside the timings)."""
    names = ceph.rbd("ls").split()
    for name in names:
        subprocess.run(
            ["rbd", "-c", ceph.conf, "snap", "unprotect", f"rbd/{name}@snap"], capture_output=True, check=False
        )
        subprocess.run(["rbd", "-c", ceph.conf, "snap", "purge", f"rbd/{name}"], capture_output=True, check=False)
        subprocess.run(["rbd", "-c", ceph.conf, "rm", f"rbd/{name}"], capture_output=True, check=False)
    if names:
        time.sleep(SETTLE_SECONDS)
