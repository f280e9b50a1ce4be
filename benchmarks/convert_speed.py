"""Conversion into Ceph RBD: diskpipe end to end against Glance's two-step way
and plain qemu-img, side by side in one run, on a realistic guest disk.

    python -m benchmarks.convert_speed [--repeat N] [--quick]

Sources: the 4 GiB Debian minbase disk of `benchmarks.guest` as qcow2,
compressed qcow2, vmdk streamOptimized and vpc. Candidates, interleaved:
- diskpipe: inspect, validate, cross-check, convert straight into RBD,
  snapshot + protect, Glance's md5/sha512 over every byte, verify;
- diskpipe without the full-size hashes (only the sparse digest, whose own
  cost is reported beside it);
- Glance's way: `qemu-img convert` to a temporary raw file, then an upload in
  8 MiB chunks through librbd, md5 and sha512 over every chunk, all-zero
  chunks skipped (`not any(chunk)`), snapshot + protect;
- plain `qemu-img convert -W -m 16 -f FMT -O raw SRC rbd:POOL/NAME`.
Also: the cost per GiB of the hashes and of zero tests, the qemu-img options
(-W, -m, -t, -S) measured on the qcow2 source, and the address space a
`convert` into RBD needs (which sets diskpipe's limit).

S3 rows (Ceph's RADOS Gateway on the same cluster), interleaved:
- diskpipe into S3: convert into a staged sparse raw file, hashes, parallel
  multipart upload beside the hashing, complete (with and without the
  full-size hashes);
- the script an operator writes: `qemu-img convert` to a raw file, then
  boto3's `upload_file` with a TransferConfig (same part size and threads).

    python -m benchmarks.convert_speed --quick --only s3 --guest-size 1G   # a short trial

The huge-image row (benchmarks.huge_image): a 1 TiB virtual qcow2 holding
1 GiB against a 1 GiB one holding the same data, with and without Glance's
hashes (`--only huge` runs it alone; `--huge-hashed-runs 0` skips the run
that hashes the whole terabyte, which takes about half an hour).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import huge_image
from benchmarks.common import (
    WORK,
    BenchCeph,
    Timing,
    ceph_cluster,
    empty_pool,
    interleaved,
    machine,
    ratio_of,
    report_head,
    script_service,
    table_rows,
    timing_of,
    write_results,
)
from benchmarks.guest import build
from diskpipe.converter.convert import ConvertRequest, convert_image
from diskpipe.converter.stores.rbd import SNAPSHOT, RbdConfig, RbdStore, qemu_rbd_target
from diskpipe.converter.stores.s3 import S3Config, S3Store
from diskpipe.jobs.pipeline import verify

GiB = 1 << 30
GLANCE_CHUNK = 8 << 20
SOURCES = {
    "qcow2": ["-O", "qcow2"],
    "qcow2-compressed": ["-O", "qcow2", "-c"],
    "vmdk-stream": ["-O", "vmdk", "-o", "subformat=streamOptimized"],
    "vpc": ["-O", "vpc", "-o", "subformat=dynamic,force_size=on"],
}
SOURCE_FORMAT = {"qcow2": "qcow2", "qcow2-compressed": "qcow2", "vmdk-stream": "vmdk", "vpc": "vpc"}


def make_sources(guest: Path, size: int = 4 * GiB) -> dict[str, Path]:
    directory = WORK / ("convert-sources" if size == 4 * GiB else f"convert-sources-{size >> 20}M")
    directory.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, args in SOURCES.items():
        path = directory / f"guest.{name}"
        if not path.exists():
            temporary = path.with_suffix(".tmp")
            subprocess.run(["qemu-img", "convert", "-f", "raw", *args, str(guest), str(temporary)], check=True)
            temporary.rename(path)
        made[name] = path
    return made


def glance_way(source: Path, fmt: str, ceph: BenchCeph, scratch: Path) -> None:
    """Glance's import: convert to a temporary raw file, then upload it."""
    import rados
    import rbd

    temporary = scratch / f"glance-{uuid.uuid4().hex[:8]}.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(source), str(temporary)], check=True)
    try:
        size = temporary.stat().st_size
        cluster = rados.Rados(conffile=ceph.conf)
        cluster.connect(timeout=10)
        try:
            ioctx = cluster.open_ioctx("rbd")
            name = f"glance-{uuid.uuid4().hex[:8]}"
            rbd.RBD().create(ioctx, name, size, order=23, old_format=False, features=1)
            md5, sha512 = hashlib.md5(), hashlib.sha512()
            with rbd.Image(ioctx, name) as image, temporary.open("rb") as handle:
                offset = 0
                while chunk := handle.read(GLANCE_CHUNK):
                    md5.update(chunk)
                    sha512.update(chunk)
                    if any(chunk):  # glance_store's thin provisioning test
                        image.write(chunk, offset)
                    offset += len(chunk)
                image.create_snap("snap")
                image.protect_snap("snap")
            ioctx.close()
        finally:
            cluster.shutdown()
    finally:
        temporary.unlink()


def plain_qemu(source: Path, fmt: str, ceph: BenchCeph, options: list[str] | None = None) -> str:
    """`qemu-img convert` into RBD; the image's name."""
    name = f"plain-{uuid.uuid4().hex[:8]}"
    target = qemu_rbd_target(RbdConfig(conf=ceph.conf), name)
    args = options if options is not None else ["-W", "-m", "16"]
    subprocess.run(["qemu-img", "convert", *args, "-f", fmt, "-O", "raw", str(source), target], check=True)
    return name


def clonable_qemu(source: Path, fmt: str, ceph: BenchCeph, ioctx: Any, snapshot_times: list[float]) -> None:
    """Plain qemu-img, then what makes its image clonable the way Glance,
    Nova and Cinder expect (a snapshot `snap`, protected), on a cluster
    handle already open: the least any tool that leaves a clonable image
    pays. Creating a snapshot is a monitor proposal, so this candidate shows
    what of diskpipe's fixed cost is Ceph's and not diskpipe's."""
    import rbd

    name = plain_qemu(source, fmt, ceph)
    started = time.perf_counter()
    with rbd.Image(ioctx, name) as image:
        image.create_snap(SNAPSHOT)
        image.protect_snap(SNAPSHOT)
    snapshot_times.append(time.perf_counter() - started)


def diskpipe_way(
    source: Path,
    store: RbdStore | S3Store,
    *,
    hashes: bool,
    report: list[dict[str, float]],
    sparse: bool = False,
    verified: bool = True,
) -> None:
    image_id = f"dp-{uuid.uuid4().hex[:8]}"
    result = convert_image(ConvertRequest(str(source), image_id, full_hashes=hashes, sparse_hash=sparse), store)
    timings = dict(result.timings)
    if verified:
        started = time.perf_counter()
        verify(store, result)
        timings["verify"] = time.perf_counter() - started
    report.append(timings)


# diskpipe's candidates in a row: name -> (Glance's full hashes, the sparse digest)
DISKPIPE_VARIANTS = {
    "diskpipe": (True, False),
    "diskpipe-no-full-hashes": (False, False),
    "diskpipe-sparse-digest": (False, True),
}


def diskpipe_candidates(
    source: Path, store: RbdStore | S3Store, variants: tuple[str, ...], *, verified: bool
) -> tuple[dict[str, Callable[[], None]], dict[str, list[dict[str, float]]]]:
    """One timed candidate per diskpipe variant, and the lists where each
    run's convert_image step timings land."""
    steps: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    candidates = {
        name: functools.partial(
            diskpipe_way, source, store, hashes=DISKPIPE_VARIANTS[name][0], sparse=DISKPIPE_VARIANTS[name][1],
            report=steps[name], verified=verified,
        )
        for name in variants
    }  # fmt: skip
    return candidates, steps


def hash_costs() -> dict[str, float]:
    """Seconds per GiB: the hashes alone and in parallel, and zero tests."""
    buffer = bytes(64 << 20)
    pieces = GiB // len(buffer)
    costs: dict[str, float] = {}
    for name in ("md5", "sha512"):
        hasher = hashlib.new(name)
        started = time.perf_counter()
        for _ in range(pieces):
            hasher.update(buffer)
        costs[f"{name}_s_per_gib"] = time.perf_counter() - started

    def run(name: str) -> None:
        hasher = hashlib.new(name)
        for _ in range(pieces):
            hasher.update(buffer)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("md5", "sha512")]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    costs["md5_and_sha512_two_threads_s_per_gib"] = time.perf_counter() - started
    chunk = bytes(GLANCE_CHUNK)
    started = time.perf_counter()
    for _ in range(16):
        any(chunk)
    costs["any_zero_test_s_per_gib"] = (time.perf_counter() - started) * (GiB / (16 * GLANCE_CHUNK))
    zeros = bytes(GLANCE_CHUNK)
    started = time.perf_counter()
    for _ in range(128):
        _ = chunk == zeros
    costs["memcmp_zero_test_s_per_gib"] = (time.perf_counter() - started) * (GiB / (128 * GLANCE_CHUNK))
    return costs


def peak_address_space(source: Path, fmt: str, ceph: BenchCeph) -> int:
    """VmPeak of a qemu-img convert into RBD, sampled from /proc while it runs."""
    name = f"vm-{uuid.uuid4().hex[:8]}"
    target = qemu_rbd_target(RbdConfig(conf=ceph.conf), name)
    process = subprocess.Popen(["qemu-img", "convert", "-W", "-m", "16", "-f", fmt, "-O", "raw", str(source), target])
    peak = 0
    while process.poll() is None:
        try:
            for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                if line.startswith("VmPeak:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.01)
    return peak


S3_KEYS = ("diskpipe-bench", "diskpipe-bench-secret")
S3_PART = 64 << 20
S3_THREADS = 4


def s3_client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=S3_KEYS[0],
        aws_secret_access_key=S3_KEYS[1],
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=10),
    )


def empty_bucket(client: Any, bucket: str, ceph: BenchCeph) -> None:
    """Remove every object and unfinished upload, and let the gateway free
    their data now (its garbage collection waits otherwise), outside the timings."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=item["Key"])
    for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    subprocess.run(
        ["radosgw-admin", "-c", ceph.conf, "gc", "process", "--include-all"], capture_output=True, check=False
    )


def operator_s3_way(source: Path, fmt: str, client: Any, bucket: str, scratch: Path) -> None:
    """The obvious script: qemu-img convert to a raw file, then upload it."""
    temporary = scratch / f"operator-{uuid.uuid4().hex[:8]}.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(source), str(temporary)], check=True)
    try:
        operator_upload(client, temporary, bucket)
    finally:
        temporary.unlink()


def operator_upload(client: Any, path: Path, bucket: str) -> None:
    from boto3.s3.transfer import TransferConfig

    client.upload_file(
        str(path),
        bucket,
        path.stem,
        Config=TransferConfig(multipart_threshold=S3_PART, multipart_chunksize=S3_PART, max_concurrency=S3_THREADS),
    )


def s3_rows(sources: dict[str, Path], ceph: BenchCeph, repeat: int, port: int, scratch: Path) -> dict[str, Any]:
    env = dict(
        ceph.env, DISKPIPE_RGW_PORT=str(port), DISKPIPE_RGW_ACCESS_KEY=S3_KEYS[0], DISKPIPE_RGW_SECRET_KEY=S3_KEYS[1]
    )
    rows: dict[str, Any] = {}
    with script_service("rgw", ceph.state, env, "DISKPIPE_S3_ENDPOINT") as endpoint:
        client = s3_client(endpoint)
        bucket = "bench"
        client.create_bucket(Bucket=bucket)
        # The first writes into the gateway's new pools are several times
        # slower than later ones: warm them up so the first candidate is not
        # the one to pay for it.
        warm = scratch / "warm-up.raw"
        warm.write_bytes(os.urandom(1 << 20) * 256)
        for _ in range(2):
            operator_upload(client, warm, bucket)
        warm.unlink()
        empty_bucket(client, bucket, ceph)
        store = S3Store(
            S3Config(
                bucket=bucket,
                endpoint=endpoint,
                access_key=S3_KEYS[0],
                secret_key=S3_KEYS[1],
                addressing="path",
                part_size=S3_PART,
                threads=S3_THREADS,
                staging_dir=str(scratch),
            )
        )
        for name, source in sources.items():
            fmt = SOURCE_FORMAT[name]
            diskpipe, steps = diskpipe_candidates(
                source, store, ("diskpipe", "diskpipe-no-full-hashes"), verified=False
            )
            timings = interleaved(
                {**diskpipe, "operator": lambda s=source, f=fmt: operator_s3_way(s, f, client, bucket, scratch)},
                repeat,
                before=lambda: empty_bucket(client, bucket, ceph),
            )
            rows[name] = {
                "timings": {key: value.to_json() for key, value in timings.items()},
                "diskpipe_steps": steps["diskpipe"],
                "diskpipe_no_hash_steps": steps["diskpipe-no-full-hashes"],
                "ratio_diskpipe_to_operator": timings["diskpipe"].median / timings["operator"].median,
                "ratio_no_hashes_to_operator": timings["diskpipe-no-full-hashes"].median / timings["operator"].median,
            }
            print(name, "s3", {key: value.text() for key, value in timings.items()}, file=sys.stderr)
        empty_bucket(client, bucket, ceph)
        drain_gateway_data(ceph)
    return rows


RGW_DATA_POOL = "default.rgw.buckets.data"
DRAIN_DEADLINE = 900.0


def drain_gateway_data(ceph: BenchCeph) -> None:
    """Wait, with the gateway still up, until its data pool holds no object.

    Deleted objects' parts are freed by the gateway's garbage collection, in
    the background: rows measured while the OSD still removes gigabytes are
    slower for it (a Glance-hash row after the S3 rows once took 0.27x instead
    of ~0.22x), and the parts left behind would fill the memstore OSD before
    the 1 TiB row. A condition with a generous deadline, not a sleep.
    """
    deadline = time.monotonic() + DRAIN_DEADLINE
    while True:
        gc = ["radosgw-admin", "-c", ceph.conf, "gc", "process", "--include-all"]
        subprocess.run(gc, capture_output=True, check=False)
        objects = pool_objects(ceph, RGW_DATA_POOL)
        if objects == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateway's data pool still holds {objects} objects after {DRAIN_DEADLINE:.0f} s")
        time.sleep(2)


def pool_objects(ceph: BenchCeph, pool: str) -> int:
    shown = subprocess.run(
        ["ceph", "-c", ceph.conf, "df", "-f", "json"], capture_output=True, text=True, check=True
    ).stdout
    for entry in json.loads(shown)["pools"]:
        if entry["name"] == pool:
            return int(entry["stats"]["objects"])
    return 0


OPTION_SETS = {
    "default (-m 8)": [],
    "-W -m 16": ["-W", "-m", "16"],
    "-W -m 4": ["-W", "-m", "4"],
    "-m 1": ["-m", "1"],
    "-W -m 16 -t none": ["-W", "-m", "16", "-t", "none"],
    "-W -m 16 -S 64k": ["-W", "-m", "16", "-S", "64k"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=None, help="runs of each candidate (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="one source, one run each")
    parser.add_argument(
        "--fast-repeat",
        type=int,
        default=None,
        help="runs of the sub-second RBD candidates (--no-hashes, plain qemu-img, with a snapshot; default 9, 1 with --quick)",
    )
    parser.add_argument("--only", choices=("all", "rbd", "s3", "huge"), default="all", help="which rows to measure")
    parser.add_argument(
        "--huge-hashed-runs", type=int, default=1, help="runs of the 1 TiB image with Glance's hashes (0: skip)"
    )
    parser.add_argument("--guest-size", default="4G", help="size of the guest disk (smaller for a trial run)")
    parser.add_argument("--ceph-port", type=int, default=6797, help="mon port of the benchmark's Ceph")
    parser.add_argument("--rgw-port", type=int, default=7497, help="port of the benchmark's S3 gateway")
    parser.add_argument("--sources", help=f"comma-separated subset of {', '.join(SOURCES)}")
    parser.add_argument(
        "--s3-sources",
        help="comma-separated subset of the sources for the S3 rows (each run uploads the whole virtual size)",
    )
    args = parser.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 3)
    args.fast_repeat = args.fast_repeat or (1 if args.quick else 9)

    from diskpipe.config import parse_size

    guest_size = parse_size(args.guest_size)
    guest: dict[str, Any] = {}
    sources: dict[str, Path] = {}
    if args.only != "huge":
        guest = build(WORK / ("guest.raw" if guest_size == 4 * GiB else f"guest-{guest_size >> 20}M.raw"), guest_size)
        sources = make_sources(Path(str(guest["path"])), guest_size)
    if args.quick and sources:
        sources = {"qcow2": sources["qcow2"]}
    if args.sources:
        sources = {name: sources[name] for name in args.sources.split(",")}
    scratch = WORK / "convert-scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"machine": machine(), "guest": guest, "repeat": repeat, "sources": {}}
    data["fast_repeat"] = args.fast_repeat
    data["guest_size"] = guest_size
    data["hash_costs"] = hash_costs()

    with ceph_cluster(memstore_bytes=12 << 30, port=args.ceph_port) as ceph:
        if args.only in ("all", "s3"):
            s3_sources = {name: sources[name] for name in args.s3_sources.split(",")} if args.s3_sources else sources
            data["s3"] = s3_rows(s3_sources, ceph, repeat, args.rgw_port, scratch)
        if args.only in ("all", "rbd"):
            measure_rbd(data, sources, ceph, repeat, scratch, args.fast_repeat)
        if args.only in ("all", "huge"):
            data["huge"] = huge_image.measure(ceph, repeat, 0 if args.quick else args.huge_hashed_runs)

    markdown = render(data)
    print(markdown)
    write_results("convert_speed" if args.only == "all" else f"convert_speed_{args.only}", markdown, data)
    return 0


def measure_rbd(
    data: dict[str, Any], sources: dict[str, Path], ceph: BenchCeph, repeat: int, scratch: Path, fast_repeat: int
) -> None:
    """Every candidate `repeat` times; then the candidates that take well
    under a second (diskpipe --no-hashes, plain qemu-img, plain qemu-img
    with Glance's snapshot) `fast_repeat` more times, interleaved among
    themselves: a fixed cost of a tenth of a second is within the noise of
    three runs on this machine."""
    import rados

    store = RbdStore(RbdConfig(conf=ceph.conf, op_timeout=120))
    cluster = rados.Rados(conffile=ceph.conf)
    cluster.connect(timeout=10)
    ioctx = cluster.open_ioctx("rbd")
    for name, source in sources.items():
        fmt = SOURCE_FORMAT[name]
        diskpipe, steps = diskpipe_candidates(source, store, tuple(DISKPIPE_VARIANTS), verified=True)
        plain_run = functools.partial(plain_qemu, source, fmt, ceph)
        timings = interleaved(
            {**diskpipe, "glance": lambda s=source, f=fmt: glance_way(s, f, ceph, scratch), "qemu-img": plain_run},
            repeat,
            before=lambda: empty_pool(ceph),
        )
        snapshot_times: list[float] = []
        fast = interleaved(
            {
                "diskpipe-no-full-hashes": diskpipe["diskpipe-no-full-hashes"],
                "qemu-img": plain_run,
                "qemu-img+snapshot": lambda s=source, f=fmt, t=snapshot_times: clonable_qemu(s, f, ceph, ioctx, t),
            },
            fast_repeat,
            before=lambda: empty_pool(ceph),
        )
        sparse_digest = Timing(tuple(entry["checksum"] for entry in steps["diskpipe-sparse-digest"]))
        no_hashes, plain, clonable = (
            fast[key].median for key in ("diskpipe-no-full-hashes", "qemu-img", "qemu-img+snapshot")
        )
        data["sources"][name] = {
            "file_size": source.stat().st_size,
            "timings": {key: value.to_json() for key, value in timings.items()},
            "fast_timings": {key: value.to_json() for key, value in fast.items()},
            "snapshot_after_qemu_img": Timing(tuple(snapshot_times)).to_json(),
            "diskpipe_steps": steps["diskpipe"],
            "diskpipe_no_hash_steps": steps["diskpipe-no-full-hashes"],
            "diskpipe_sparse_digest_steps": steps["diskpipe-sparse-digest"],
            "sparse_digest": sparse_digest.to_json(),
            "ratio_diskpipe_to_glance": timings["diskpipe"].median / timings["glance"].median,
            # --no-hashes: no digest at all (the sparse one costs a read of the allocated data).
            "ratio_no_hashes_to_qemu_img": no_hashes / plain,
            "ratio_clonable_to_qemu_img": clonable / plain,
            "ratio_no_hashes_to_clonable": no_hashes / clonable,
            "ratio_sparse_digest_to_qemu_img": timings["diskpipe-sparse-digest"].median / timings["qemu-img"].median,
        }
        print(name, {key: value.text() for key, value in {**timings, **fast}.items()}, file=sys.stderr)
    ioctx.close()
    cluster.shutdown()
    empty_pool(ceph)
    if "qcow2" in sources:
        qcow2 = sources["qcow2"]
        options = interleaved(
            {label: lambda o=opts: plain_qemu(qcow2, "qcow2", ceph, o) for label, opts in OPTION_SETS.items()},
            repeat,
            before=lambda: empty_pool(ceph),
        )
        data["qemu_options"] = {label: timing.to_json() for label, timing in options.items()}
        empty_pool(ceph)
        data["qemu_img_peak_address_space"] = peak_address_space(qcow2, "qcow2", ceph)
        empty_pool(ceph)
    store.close()


def render(data: dict[str, Any]) -> str:
    lines = report_head("Conversion into Ceph RBD and S3", data["machine"])
    if "s3" in data:
        lines += render_s3(data)
    if data["sources"]:
        lines += render_rbd(data)
    if "huge" in data:
        lines += huge_image.render(data["huge"])
    return "\n".join(lines)


def guest_and_runs(data: dict[str, Any], guest_detail: str = "") -> str:
    """The sentence every table's introduction starts with: the guest disk and how it is timed."""
    return (
        f"Guest disk: {data.get('guest_size', 4 * GiB) / GiB:.0f} GiB virtual{guest_detail}. "
        f"Median wall time of {data['repeat']} interleaved runs (min–max)"
    )


def render_s3(data: dict[str, Any]) -> list[str]:
    lines = [
        "## Into S3 (Ceph's RADOS Gateway)",
        "",
        guest_and_runs(data) + f". Both upload with {S3_PART >> 20} MiB parts, {S3_THREADS} in parallel, "
        "to a gateway on the same 2-core machine as the client.",
        "",
        "| source | diskpipe (Glance hashes) | diskpipe (no full hashes) | qemu-img + boto3 upload_file | "
        "diskpipe / script | no-hash / script |",
        "|---|---|---|---|---|---|",
    ]
    timings = [timing_of(key) for key in ("diskpipe", "diskpipe-no-full-hashes", "operator")]
    ratios = [ratio_of("ratio_diskpipe_to_operator"), ratio_of("ratio_no_hashes_to_operator")]
    lines += table_rows(data["s3"], timings + ratios)
    lines += [
        "",
        "diskpipe's steps (medians, seconds; the upload runs beside the hashing, in `seal`):",
        "",
        "| source | inspect + cross-check | qemu-img convert (staged file) | hashes | upload (beside) | total |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for name, entry in data["s3"].items():
        steps = entry["diskpipe_steps"]

        def step(key: str, steps: list[dict[str, float]] = steps) -> float:
            return statistics.median(run.get(key, 0.0) for run in steps)

        lines.append(
            f"| {name} | {step('inspect') + step('cross_check'):.3f} | {step('convert'):.3f} | "
            f"{step('checksum'):.3f} | {step('seal'):.3f} | {step('total'):.3f} |"
        )
    lines.append("")
    return lines


def sparse_read_back(entry: dict[str, Any]) -> str:
    """The sparse digest's own read of the allocated data, as a table cell."""
    return f"{entry['sparse_digest']['median']:.2f} s"


def render_rbd(data: dict[str, Any]) -> list[str]:
    lines = [
        "## Into Ceph RBD",
        "",
        guest_and_runs(data, f", {data['guest']['source']}")
        + "; every candidate writes a thin raw image with a protected snapshot into the same one-node Ceph.",
        "",
        "| source | diskpipe (Glance hashes) | diskpipe `--no-hashes` | diskpipe, sparse digest only | Glance's way "
        "| plain qemu-img | diskpipe / Glance | sparse digest / qemu-img | sparse digest's read-back |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    candidates = ("diskpipe", "diskpipe-no-full-hashes", "diskpipe-sparse-digest", "glance", "qemu-img")
    ratios = [ratio_of("ratio_diskpipe_to_glance"), ratio_of("ratio_sparse_digest_to_qemu_img", bold=False)]
    lines += table_rows(data["sources"], [*map(timing_of, candidates), *ratios, sparse_read_back])
    lines += [
        "",
        f"`--no-hashes` against plain qemu-img, {data.get('fast_repeat', data['repeat'])} more interleaved runs of "
        "these three (median, min–max): plain qemu-img leaves an image nothing can clone; the third candidate adds "
        "what Glance, Nova and Cinder clone from (snapshot `snap`, protected) on an open cluster handle, a monitor "
        "proposal that no tool writing such an image avoids.",
        "",
        "| source | diskpipe `--no-hashes` | plain qemu-img | qemu-img + snapshot | its snapshot step "
        "| no-hashes / qemu-img | qemu-img + snapshot / qemu-img | no-hashes / qemu-img + snapshot |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fast = [timing_of(key, "fast_timings") for key in ("diskpipe-no-full-hashes", "qemu-img", "qemu-img+snapshot")]
    fast += [
        lambda entry: f"{entry['snapshot_after_qemu_img']['median'] * 1000:.0f} ms",
        ratio_of("ratio_no_hashes_to_qemu_img"),
        ratio_of("ratio_clonable_to_qemu_img", bold=False),
        ratio_of("ratio_no_hashes_to_clonable", bold=False),
    ]
    lines += table_rows({name: entry for name, entry in data["sources"].items() if "fast_timings" in entry}, fast)
    lines += [
        "",
        "Where diskpipe's time goes with `--no-hashes` (medians, seconds): after qemu-img, the image is sealed "
        "(snapshot + protect, a monitor round) while the re-inspection reads its first blocks; nothing else is "
        "read back, and verify only checks the snapshot's size.",
        "",
        "| source | inspect | cross-check (beside creating the target) | create target | qemu-img convert | "
        "re-inspect (beside the snapshot) | snapshot | rename and rest | verify | total | "
        "convert step / plain qemu-img |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, entry in data["sources"].items():
        steps = entry["diskpipe_no_hash_steps"]

        def step(*keys: str, steps: list[dict[str, float]] = steps) -> float:
            return statistics.median(sum(run.get(key, 0.0) for key in keys) for run in steps)

        rest = statistics.median(
            run["total"]
            - run["inspect"]
            - max(run["cross_check"], run.get("begin", 0.0))  # side by side (before: begin counted in the rest)
            - run["convert"]
            - run.get("checksum", 0.0)
            - max(run.get("seal", 0.0) if "reinspect" in run else 0.0, run.get("reinspect", 0.0))
            for run in steps
        )
        plain = entry.get("fast_timings", entry["timings"])["qemu-img"]["median"]
        lines.append(
            f"| {name} | {step('inspect'):.3f} | {step('cross_check'):.3f} | {step('begin'):.3f} | "
            f"{step('convert'):.3f} | {step('reinspect'):.3f} | "
            f"{step('seal'):.3f} | {rest:.3f} | {step('verify'):.3f} | {step('total', 'verify'):.3f} | "
            f"{step('convert') / plain:.2f}× |"
        )
    costs = data["hash_costs"]
    lines += [
        "",
        "Cost per GiB on this machine (one core unless stated): "
        f"md5 {costs['md5_s_per_gib']:.2f} s, sha512 {costs['sha512_s_per_gib']:.2f} s, "
        f"both on two threads {costs['md5_and_sha512_two_threads_s_per_gib']:.2f} s wall; "
        f"zero test with `any(chunk)` (Glance) {costs['any_zero_test_s_per_gib']:.2f} s, "
        f"with a C compare (`chunk == zeros`) {costs['memcmp_zero_test_s_per_gib']:.3f} s.",
        "",
        "## qemu-img options (qcow2 source into RBD)",
        "",
        "| options | median | min–max |",
        "|---|---|---|",
    ]
    for label, timing in data.get("qemu_options", {}).items():
        lines.append(f"| `{label}` | {timing['median']:.2f} s | {timing['min']:.2f}–{timing['max']:.2f} |")
    lines += [
        "",
        f"Peak address space of a `qemu-img convert` into RBD: {data.get('qemu_img_peak_address_space', 0) / GiB:.2f} GiB "
        "(diskpipe's limit for convert is 4 GiB).",
        "",
    ]
    return lines


if __name__ == "__main__":
    sys.exit(main())
