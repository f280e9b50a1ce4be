"""Conversion into Ceph RBD: diskpipe end to end against Glance's two-step way
and plain qemu-img, side by side in one run, on a realistic guest disk.

    python -m benchmarks.convert_speed [--repeat N] [--quick]

Sources: the 4 GiB Debian minbase disk of `benchmarks.guest` as qcow2,
compressed qcow2, vmdk streamOptimized and vpc. Candidates, interleaved:
- diskpipe: inspect, validate, cross-check, convert straight into RBD,
  snapshot + protect, Glance's md5/sha512 over every byte of the snapshot
  (one read of its allocated data), verify (no read);
- diskpipe with `--no-hashes`: no digest at all, nothing read back but the
  re-inspection's few blocks;
- diskpipe with the sparse digest only (`--no-hashes --sparse-hash`): one read
  of the allocated data, whose cost is reported beside;
- Glance's way: `qemu-img convert` to a temporary raw file, then an upload in
  8 MiB chunks through librbd, md5 and sha512 over every chunk, all-zero
  chunks skipped (`not any(chunk)`), snapshot + protect;
- plain `qemu-img convert -W -m 16 -f FMT -O raw SRC rbd:POOL/NAME`.
Also: the cost per GiB of the hashes and of zero tests, the qemu-img options
(-W, -m, -t, -S) measured on the qcow2 source, and the address space a
`convert` into RBD needs (which sets diskpipe's limit).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.common import (
    WORK,
    BenchCeph,
    Timing,
    ceph_cluster,
    empty_pool,
    interleaved,
    machine,
    machine_markdown,
    timing_cell,
    write_results,
)
from benchmarks.guest import build
from diskpipe.converter.convert import ConvertRequest, convert_image
from diskpipe.converter.stores.rbd import RbdConfig, RbdStore, qemu_rbd_target
from diskpipe.tasks.pipeline import verify

GiB = 1 << 30
GLANCE_CHUNK = 8 << 20
SOURCES = {
    "qcow2": ["-O", "qcow2"],
    "qcow2-compressed": ["-O", "qcow2", "-c"],
    "vmdk-stream": ["-O", "vmdk", "-o", "subformat=streamOptimized"],
    "vpc": ["-O", "vpc", "-o", "subformat=dynamic,force_size=on"],
}
SOURCE_FORMAT = {"qcow2": "qcow2", "qcow2-compressed": "qcow2", "vmdk-stream": "vmdk", "vpc": "vpc"}


def make_sources(guest: Path) -> dict[str, Path]:
    directory = WORK / "convert-sources"
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


def plain_qemu(source: Path, fmt: str, ceph: BenchCeph, options: list[str] | None = None) -> None:
    name = f"plain-{uuid.uuid4().hex[:8]}"
    target = qemu_rbd_target(RbdConfig(conf=ceph.conf), name)
    args = options if options is not None else ["-W", "-m", "16"]
    subprocess.run(["qemu-img", "convert", *args, "-f", fmt, "-O", "raw", str(source), target], check=True)


def diskpipe_way(
    source: Path, store: RbdStore, *, hashes: bool, report: list[dict[str, float]], sparse: bool = False
) -> None:
    image_id = f"dp-{uuid.uuid4().hex[:8]}"
    result = convert_image(ConvertRequest(str(source), image_id, full_hashes=hashes, sparse_hash=sparse), store)
    started = time.perf_counter()
    verify(store, result)
    timings = dict(result.timings)
    timings["verify"] = time.perf_counter() - started
    report.append(timings)


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
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one source, one run each")
    parser.add_argument("--sources", help=f"comma-separated subset of {', '.join(SOURCES)}")
    parser.add_argument(
        "--no-extras", action="store_true", help="skip the qemu-img options and address space; write no results"
    )
    parser.add_argument("--ceph-port", type=int, default=6797, help="the benchmark Ceph's monitor port")
    args = parser.parse_args(argv)
    repeat = 1 if args.quick else args.repeat

    guest = build(WORK / "guest.raw")
    guest_path = Path(str(guest["path"]))
    sources = make_sources(guest_path)
    if args.quick:
        sources = {"qcow2": sources["qcow2"]}
    if args.sources:
        sources = {name: sources[name] for name in args.sources.split(",")}
    scratch = WORK / "convert-scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"machine": machine(), "guest": guest, "repeat": repeat, "sources": {}}
    data["hash_costs"] = hash_costs()

    with ceph_cluster(memstore_bytes=12 << 30, port=args.ceph_port) as ceph:
        store = RbdStore(RbdConfig(conf=ceph.conf, op_timeout=120))
        for name, source in sources.items():
            fmt = SOURCE_FORMAT[name]
            with_hashes: list[dict[str, float]] = []
            without_hashes: list[dict[str, float]] = []
            sparse_only: list[dict[str, float]] = []
            timings = interleaved(
                {
                    "diskpipe": lambda s=source, r=with_hashes: diskpipe_way(s, store, hashes=True, report=r),
                    "diskpipe-no-full-hashes": lambda s=source, r=without_hashes: diskpipe_way(
                        s, store, hashes=False, report=r
                    ),
                    "diskpipe-sparse-digest": lambda s=source, r=sparse_only: diskpipe_way(
                        s, store, hashes=False, sparse=True, report=r
                    ),
                    "glance": lambda s=source, f=fmt: glance_way(s, f, ceph, scratch),
                    "qemu-img": lambda s=source, f=fmt: plain_qemu(s, f, ceph),
                },
                repeat,
                before=lambda: empty_pool(ceph),
            )
            sparse_digest = Timing(tuple(entry["checksum"] for entry in sparse_only))
            data["sources"][name] = {
                "file_size": source.stat().st_size,
                "timings": {key: value.to_json() for key, value in timings.items()},
                "diskpipe_steps": with_hashes,
                "diskpipe_no_hash_steps": without_hashes,
                "diskpipe_sparse_digest_steps": sparse_only,
                "sparse_digest": sparse_digest.to_json(),
                "ratio_diskpipe_to_glance": timings["diskpipe"].median / timings["glance"].median,
                # --no-hashes: no digest at all (the sparse one costs a read of the allocated data).
                "ratio_no_hashes_to_qemu_img": timings["diskpipe-no-full-hashes"].median / timings["qemu-img"].median,
                "ratio_sparse_digest_to_qemu_img": timings["diskpipe-sparse-digest"].median
                / timings["qemu-img"].median,
            }
            print(name, {key: value.text() for key, value in timings.items()}, file=sys.stderr)
        empty_pool(ceph)
        if args.no_extras:
            store.close()
            print(json.dumps(data["sources"], indent=1))
            print("\n".join(render_sources(data)))
            return 0
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

    markdown = render(data)
    print(markdown)
    write_results("convert_speed", markdown, data)
    return 0


def render_sources(data: dict[str, Any]) -> list[str]:
    lines = [
        "| source | diskpipe (Glance hashes) | diskpipe `--no-hashes` | diskpipe, sparse digest only | Glance's way "
        "| plain qemu-img | diskpipe / Glance | no-hashes / qemu-img | sparse digest / qemu-img | "
        "sparse digest's read-back |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in data["sources"].items():
        timings = entry["timings"]

        def cell(key: str, timings: dict[str, Any] = timings) -> str:
            return timing_cell(timings[key])

        lines.append(
            f"| {name} | {cell('diskpipe')} | {cell('diskpipe-no-full-hashes')} | {cell('diskpipe-sparse-digest')} | "
            f"{cell('glance')} | {cell('qemu-img')} | **{entry['ratio_diskpipe_to_glance']:.2f}×** | "
            f"**{entry['ratio_no_hashes_to_qemu_img']:.2f}×** | {entry['ratio_sparse_digest_to_qemu_img']:.2f}× | "
            f"{entry['sparse_digest']['median']:.2f} s |"
        )
    lines += [
        "",
        "Where diskpipe's time goes with `--no-hashes` (medians, seconds): after qemu-img, the image is sealed "
        "(snapshot + protect, a monitor round) while the re-inspection reads its first blocks; nothing else is "
        "read back, and verify only checks the snapshot's size.",
        "",
        "| source | inspect + cross-check | qemu-img convert | re-inspect (beside the snapshot) | snapshot | "
        "rename and rest | verify | total | convert step / plain qemu-img |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name, entry in data["sources"].items():
        steps = entry["diskpipe_no_hash_steps"]

        def step(*keys: str, steps: list[dict[str, float]] = steps) -> float:
            return statistics.median(sum(run.get(key, 0.0) for key in keys) for run in steps)

        rest = statistics.median(
            run["total"]
            - run["inspect"]
            - run["cross_check"]
            - run["convert"]
            - run.get("checksum", 0.0)
            - max(run.get("seal", 0.0) if "reinspect" in run else 0.0, run.get("reinspect", 0.0))
            for run in steps
        )
        plain = entry["timings"]["qemu-img"]["median"]
        lines.append(
            f"| {name} | {step('inspect', 'cross_check'):.3f} | {step('convert'):.3f} | {step('reinspect'):.3f} | "
            f"{step('seal'):.3f} | {rest:.3f} | {step('verify'):.3f} | {step('total', 'verify'):.3f} | "
            f"{step('convert') / plain:.2f}× |"
        )
    return lines


def render(data: dict[str, Any]) -> str:
    lines = [
        "# Conversion into Ceph RBD",
        "",
        machine_markdown(data["machine"]),
        "",
        f"Guest disk: 4 GiB virtual, {data['guest']['source']}. Median wall time of {data['repeat']} interleaved runs "
        "(min–max); every candidate writes a thin raw image with a protected snapshot into the same one-node Ceph. "
        "diskpipe hashes the sealed snapshot in one read of its allocated data; `--no-hashes` reads nothing back "
        "but the re-inspection's first blocks.",
        "",
        *render_sources(data),
    ]
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
    for label, timing in data["qemu_options"].items():
        lines.append(f"| `{label}` | {timing['median']:.2f} s | {timing['min']:.2f}–{timing['max']:.2f} |")
    lines += [
        "",
        f"Peak address space of a `qemu-img convert` into RBD: {data['qemu_img_peak_address_space'] / GiB:.2f} GiB "
        "(diskpipe's limit for convert is 4 GiB).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
