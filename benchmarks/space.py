"""What does each disk format really cost in space, on disk and in Ceph RBD?

Operators say "a 20 GB disk takes 20 GB as raw and 5 GB as qcow2, and Ceph
wants raw anyway". This benchmark converts each input image with qemu-img to
raw (sparse), qcow2, qcow2 compressed with zlib and with zstd, vmdk
streamOptimized, vpc (dynamic) and vdi, and reports for each version its
virtual size, file size (st_size), what it really occupies on the local
filesystem (st_blocks * 512) and diskpipe's own count of allocated guest bytes.
`qemu-img measure` of the input gives what a raw or qcow2 target would need.

Every version holds the same guest data (checked with `qemu-img compare`) and
RBD stores raw whatever the upload format, so the RBD cost is measured once per
input, from the raw version: thin (zeros skipped, the way qemu-img and diskpipe
upload) and thick (every byte written, zeros included), with `rbd du`, on a
throw-away one-node Ceph (memstore) started for the run.

    python -m benchmarks.space [IMAGE ...] [--no-rbd] [--keep]

Without IMAGE: the guest disk of benchmarks.guest (4 GiB, ext4, Debian
minbase). Results: benchmarks/results/space.{md,json,csv,png}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, WORK, BenchCeph, ceph_cluster, machine, report_head, write_results
from diskpipe.formats import inspect

MIB = 1 << 20
GIB = 1 << 30
# Our own port and memstore: other benchmarks use 6797, the tests 6791/6795,
# and they may be running at the same time on this machine.
CEPH_PORT = 6799
MEMSTORE_BYTES = 12 << 30
POOL = "rbd"
# A memstore OSD turns "full" near 95 % and then client writes hang instead of
# failing; it also holds about twice the data written in RAM. Stay well below.
MEMSTORE_USABLE = 0.8
RAM_PER_BYTE = 2


@dataclass(frozen=True)
class Version:
    """One output of `qemu-img convert`."""

    name: str
    driver: str
    options: tuple[str, ...]
    suffix: str


VERSIONS = (
    # qemu-img's default -S 4k leaves any all-zero 4 KiB block as a hole.
    Version("raw (sparse)", "raw", (), "raw"),
    Version("qcow2", "qcow2", (), "qcow2"),
    Version("qcow2 zlib", "qcow2", ("-c", "-o", "compression_type=zlib"), "zlib.qcow2"),
    Version("qcow2 zstd", "qcow2", ("-c", "-o", "compression_type=zstd"), "zstd.qcow2"),
    Version("vmdk streamOptimized", "vmdk", ("-o", "subformat=streamOptimized"), "vmdk"),
    # force_size=on: without it qemu rounds the size to a CHS geometry and the
    # virtual sizes would not be comparable.
    Version("vpc dynamic", "vpc", ("-o", "subformat=dynamic,force_size=on"), "vhd"),
    Version("vdi dynamic", "vdi", ("-o", "static=off"), "vdi"),
)


def run(args: Sequence[str], env: dict[str, str] | None = None) -> str:
    result = subprocess.run(list(args), capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr.strip()[-2000:]}")
    return result.stdout


def timed(args: Sequence[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    run(args, env)
    return time.perf_counter() - started


def human(size: float | None) -> str:
    if size is None:
        return "–"
    if abs(size) >= GIB:
        return f"{size / GIB:.2f} GiB"
    return f"{size / MIB:.1f} MiB"


def percent(part: float | None, whole: int) -> str:
    return "–" if part is None or not whole else f"{100 * part / whole:.1f} %"


def on_disk(path: Path) -> tuple[int, int]:
    """(st_size, st_blocks * 512) after an fsync: ext4 only charges its
    extent-tree blocks to st_blocks once delayed allocation has run, so a
    stat straight after qemu-img can come out a few KiB short."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        status = os.fstat(fd)
    finally:
        os.close(fd)
    return status.st_size, status.st_blocks * 512


def qemu_virtual_size(path: Path, driver: str) -> int:
    info = json.loads(run(["qemu-img", "info", "--output=json", "-f", driver, str(path)]))
    return int(info["virtual-size"])


def measure_input(path: Path, driver: str) -> dict[str, dict[str, int]]:
    out = {}
    for target in ("raw", "qcow2"):
        raw = json.loads(run(["qemu-img", "measure", "--output=json", "-f", driver, "-O", target, str(path)]))
        out[target] = {"required": int(raw["required"]), "fully_allocated": int(raw["fully-allocated"])}
    return out


def same_content(source: Path, source_driver: str, copy: Path, copy_driver: str) -> bool:
    """qemu-img compare: 0 identical, 1 different, 2+ error. Unallocated and
    zero read alike, which is the guest's view we care about."""
    result = subprocess.run(
        ["qemu-img", "compare", "-f", source_driver, "-F", copy_driver, str(source), str(copy)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode > 1:
        raise RuntimeError(f"qemu-img compare failed: {result.stderr.strip()}")
    return result.returncode == 0


def file_row(name: str, driver: str, options: Sequence[str], path: Path, seconds: float | None) -> dict[str, Any]:
    file_size, allocated = on_disk(path)
    info = inspect(path, allocation=True)
    return {
        "version": name,
        "driver": driver,
        "options": " ".join(options),
        "path": str(path),
        "virtual_size": qemu_virtual_size(path, driver),
        "diskpipe_virtual_size": info.virtual_size,
        "file_size": file_size,
        "on_disk": allocated,
        "diskpipe_allocated": info.allocated_size,
        "convert_seconds": seconds,
    }


def rbd_du(ceph: BenchCeph, image: str, *, exact: bool) -> int:
    args = ["du", "--format", "json", *(["--exact"] if exact else []), f"{POOL}/{image}"]
    return int(json.loads(ceph.rbd(*args))["images"][0]["used_size"])


def rbd_row(ceph: BenchCeph, raw: Path, image: str, *, thick: bool) -> dict[str, Any]:
    """Upload the raw version with qemu-img (which creates the RBD image) and
    ask rbd du what it costs. Thin: qemu-img knows a new RBD image reads as
    zeros and skips zero blocks. Thick: -S 0 turns that off, so every zero is
    written too (what a plain `dd` or a non-sparse `rbd import` would do)."""
    target = f"rbd:{POOL}/{image}:conf={ceph.conf}"
    args = ["qemu-img", "convert", *(["-S", "0"] if thick else []), "-f", "raw", "-O", "raw", str(raw), target]
    try:
        seconds = timed(args, ceph.env)
        info = json.loads(ceph.rbd("info", "--format", "json", f"{POOL}/{image}"))
        used = rbd_du(ceph, image, exact=False)
        # Default du: with object-map + fast-diff it counts whole objects
        # (4 MiB). --exact asks the OSD for each object's extents instead.
        exact = rbd_du(ceph, image, exact=True)
    finally:
        # Memstore keeps everything in RAM: free it before the next upload.
        subprocess.run(
            ["rbd", "-c", ceph.conf, "rm", "--no-progress", f"{POOL}/{image}"], capture_output=True, check=False
        )
    return {
        "version": "RBD thick" if thick else "RBD thin",
        "written_with": " ".join(args[:-2]),
        "provisioned": int(info["size"]),
        "object_size": int(info["object_size"]),
        "features": info.get("features", []),
        "used": used,
        "used_exact": exact,
        "upload_seconds": seconds,
    }


def memory_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def fits_in_ceph(size: int, memstore: int) -> str | None:
    """Why an upload of `size` bytes must not be tried, or None if it fits."""
    if size > memstore * MEMSTORE_USABLE:
        return f"{human(size)} would fill the {human(memstore)} memstore (writes hang when full)"
    if size * RAM_PER_BYTE > memory_available():
        return f"{human(size)} needs ~{human(size * RAM_PER_BYTE)} of RAM in the memstore OSD"
    return None


def study(path: Path, source: str, ceph: BenchCeph | None, memstore: int, scratch: Path) -> dict[str, Any]:
    # Never let qemu-img probe: the format comes from diskpipe's inspection.
    driver = inspect(path).format
    scratch.mkdir(parents=True, exist_ok=True)
    stem = path.name.split(".")[0]
    result: dict[str, Any] = {"input": str(path), "name": path.name, "source": source, "driver": driver}
    result["measure"] = measure_input(path, driver)
    rows = [file_row(f"input ({driver})", driver, (), path, None)]
    raw_copy: Path | None = None
    for version in VERSIONS:
        out = scratch / f"{stem}.{version.suffix}"
        out.unlink(missing_ok=True)
        seconds = timed(
            ["qemu-img", "convert", "-f", driver, "-O", version.driver, *version.options, str(path), str(out)]
        )
        row = file_row(version.name, version.driver, version.options, out, seconds)
        row["same_content"] = same_content(path, driver, out, version.driver)
        rows.append(row)
        if version.driver == "raw":
            raw_copy = out
        print(f"  {version.name}: {human(row['on_disk'])} on disk, {seconds:.2f} s", file=sys.stderr)
    result["files"] = rows
    result["virtual_size"] = rows[0]["virtual_size"]
    result["rbd"] = []
    result["rbd_skipped"] = {}
    if ceph is not None and raw_copy is not None:
        for thick in (False, True):
            label = "thick" if thick else "thin"
            need = result["virtual_size"] if thick else rows[1]["on_disk"]
            reason = fits_in_ceph(need, memstore)
            if reason is not None:
                result["rbd_skipped"][label] = reason
                continue
            row = rbd_row(ceph, raw_copy, f"space-{stem}-{label}", thick=thick)
            if thick and row["used_exact"] < row["provisioned"]:
                # -S 0 is supposed to write everything; say so if it did not.
                row["warning"] = "not fully allocated: the thick upload skipped some zeros"
            result["rbd"].append(row)
            print(f"  RBD {label}: {human(row['used'])} used, {row['upload_seconds']:.2f} s", file=sys.stderr)
    return result


def findings(result: dict[str, Any]) -> list[str]:
    """A few computed sentences that answer the operators' claim."""
    virtual = result["virtual_size"]
    by_name = {row["version"]: row for row in result["files"]}
    raw = by_name["raw (sparse)"]
    qcow2 = by_name["qcow2"]
    smallest = min(result["files"][1:], key=lambda row: row["on_disk"])
    lines = [
        f"raw: the file *says* {human(raw['file_size'])} (= virtual), but holes cost nothing: "
        f"{human(raw['on_disk'])} on disk ({percent(raw['on_disk'], virtual)} of virtual). "
        f"Plain qcow2 is no smaller: {human(qcow2['on_disk'])} on disk, file {human(qcow2['file_size'])}.",
        f"Only compression saves more: smallest is {smallest['version']} at {human(smallest['on_disk'])} "
        f"({100 * smallest['on_disk'] / raw['on_disk']:.0f} % of the sparse raw).",
        f"`qemu-img measure -O raw` says {human(result['measure']['raw']['required'])} (it assumes a fully "
        f"allocated raw), `-O qcow2` {human(result['measure']['qcow2']['required'])}.",
    ]
    different = [row["version"] for row in result["files"][1:] if not row.get("same_content", True)]
    lines.append(
        "All versions hold the same guest data (`qemu-img compare`)."
        if not different
        else f"`qemu-img compare` found DIFFERENT content in: {', '.join(different)}."
    )
    for row in result["rbd"]:
        lines.append(
            f"{row['version']}: {human(row['used'])} used per `rbd du` ({percent(row['used'], virtual)} of virtual), "
            f"{human(row['used_exact'])} with `--exact`" + (f" — {row['warning']}" if "warning" in row else "") + "."
        )
    for label, reason in result["rbd_skipped"].items():
        lines.append(f"RBD {label} skipped: {reason}.")
    # The cross-check: for raw, diskpipe reads the same extents the filesystem
    # charges for, so any gap is filesystem metadata (ext4 puts its extent-tree
    # blocks in st_blocks) and must stay a few KiB.
    for row in result["files"]:
        if row["driver"] == "raw" and row["diskpipe_allocated"] is not None:
            gap = row["on_disk"] - row["diskpipe_allocated"]
            lines.append(
                f"{row['version']}: st_blocks − diskpipe allocated = {gap} bytes"
                + (" (identical)." if gap == 0 else " (filesystem metadata: ext4 extent-tree blocks).")
            )
    thin = next((row for row in result["rbd"] if row["version"] == "RBD thin"), None)
    raw_row = next(row for row in result["files"][1:] if row["driver"] == "raw")
    if thin is not None and raw_row["diskpipe_allocated"] is not None:
        lines.append(
            f"RBD thin `--exact` − diskpipe allocated of the raw = {thin['used_exact'] - raw_row['diskpipe_allocated']} "
            f"bytes; `rbd du` − diskpipe = {thin['used'] - raw_row['diskpipe_allocated']} bytes "
            f"({thin['object_size'] // MIB} MiB objects)."
        )
    return lines


def markdown_for(result: dict[str, Any]) -> str:
    virtual = result["virtual_size"]
    lines = [
        f"## {result['name']} — {result['driver']}, {human(virtual)} virtual",
        "",
        f"Source: {result['source']}. `qemu-img measure` of the input: "
        f"`-O raw` required {human(result['measure']['raw']['required'])}, "
        f"`-O qcow2` required {human(result['measure']['qcow2']['required'])} "
        f"(fully allocated {human(result['measure']['qcow2']['fully_allocated'])}).",
        "",
        "| version | qemu-img options | virtual | file size | on disk | file % of virtual | on disk % of virtual "
        "| diskpipe allocated | convert | same data |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|:-:|",
    ]
    for row in result["files"]:
        command = " ".join(["-O", row["driver"], *row["options"].split()])
        options = "–" if row["convert_seconds"] is None else f"`{command}`"
        seconds = "–" if row["convert_seconds"] is None else f"{row['convert_seconds']:.2f} s"
        same = "–" if "same_content" not in row else ("yes" if row["same_content"] else "**NO**")
        lines.append(
            f"| {row['version']} | {options} | {human(row['virtual_size'])} | {human(row['file_size'])} "
            f"| {human(row['on_disk'])} | {percent(row['file_size'], virtual)} | {percent(row['on_disk'], virtual)} "
            f"| {human(row['diskpipe_allocated'])} | {seconds} | {same} |"
        )
    if result["rbd"] or result["rbd_skipped"]:
        lines += [
            "",
            "RBD stores raw whatever the upload format (qemu-img and diskpipe convert on the way in), and every "
            "version above holds the same data, so RBD is measured once, from the raw version:",
            "",
            "| RBD image | provisioned | `rbd du` used | % of virtual | `rbd du --exact` | upload |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        for row in result["rbd"]:
            lines.append(
                f"| {row['version']} (`{row['written_with']}`) | {human(row['provisioned'])} | {human(row['used'])} "
                f"| {percent(row['used'], virtual)} | {human(row['used_exact'])} | {row['upload_seconds']:.2f} s |"
            )
        for label, reason in result["rbd_skipped"].items():
            lines.append(f"| RBD {label} | – | skipped: {reason} | – | – | – |")
    lines += ["", *[f"- {line}" for line in findings(result)], ""]
    return "\n".join(lines)


NOTES = """Columns: *file size* is st_size (what `ls -l` and a download show); *on disk* is st_blocks × 512 (what
the local filesystem really spends, `du`), read after an fsync; *diskpipe allocated* is
`inspect(path, allocation=True).allocated_size`, guest bytes that the format's tables mark as
holding data (for raw: the file's data extents). It counts guest bytes, not file bytes, at the
format's granularity (qcow2 and vmdk 64 KiB clusters/grains, vdi 1 MiB blocks, vpc 2 MiB blocks),
so for compressed formats it is far above the file, and it ignores the format's own metadata.
`rbd du` counts whole 4 MiB objects when the image has object-map + fast-diff (qemu-img's default
features); `--exact` asks the OSD for each object's data (on a memstore OSD: the object's length,
from its start to its last written byte). Conversion and upload times are one run each, the input
in the page cache, informative only. RBD is a one-node memstore Ceph (size 1), so these are the
bytes of one replica: multiply by the pool's replication (usually 3) for raw capacity.
"""


def bar_text(size: float) -> str:
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / MIB:.0f} MiB"


def chart(results: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a server; must come before pyplot
    import matplotlib.pyplot as plt

    colors = {"file": "#9ecae1", "disk": "#2171b5", "thin": "#74c476", "thick": "#d94801"}
    figure, axes = plt.subplots(len(results), 1, figsize=(13, 6.5 * len(results)), squeeze=False)
    for axis, result in zip(axes[:, 0], results, strict=True):
        rows = result["files"][1:]  # the versions; the input is the raw's twin
        width = 0.38
        positions = list(range(len(rows)))
        labels = [row["version"].replace(" ", "\n", 1) for row in rows]
        bars = [
            axis.bar(
                [p - width / 2 for p in positions],
                [row["file_size"] / GIB for row in rows],
                width,
                color=colors["file"],
                label="file size (st_size)",
            ),
            axis.bar(
                [p + width / 2 for p in positions],
                [row["on_disk"] / GIB for row in rows],
                width,
                color=colors["disk"],
                label="allocated on disk (st_blocks)",
            ),
        ]
        if result["rbd"]:
            # RBD is one group: it holds raw whatever was uploaded.
            group = len(rows) + 0.3
            for offset, row in zip((-width / 2, width / 2), result["rbd"], strict=False):
                kind = "thick" if row["version"].endswith("thick") else "thin"
                bars.append(
                    axis.bar(
                        [group + offset],
                        [row["used"] / GIB],
                        width,
                        color=colors[kind],
                        label=f"RBD {kind} (rbd du)",
                    )
                )
            positions.append(group)
            labels.append("RBD\n(stores raw)")
        for container in bars:
            # GiB with two decimals would show 91 and 95 MiB alike as "0.09".
            sizes = [patch.get_height() * GIB for patch in container.patches]
            axis.bar_label(container, labels=[bar_text(size) for size in sizes], padding=2, fontsize=8)
        virtual = result["virtual_size"] / GIB
        axis.axhline(virtual, color="grey", linestyle="--", linewidth=1)
        # Mid-plot: the ends hold the raw and thick bars that reach the line.
        axis.text(
            (len(rows) - 1) / 2, virtual, f"virtual size {virtual:.2f} GiB", ha="center", va="bottom", color="dimgrey"
        )
        axis.set_xticks(positions, labels, fontsize=9)
        axis.set_xlim(-0.6, positions[-1] + 0.6)
        axis.set_ylim(0, virtual * 1.12)
        axis.set_ylabel("GiB")
        axis.set_title(f"Space per format: {result['name']} ({result['driver']}, {virtual:.2f} GiB virtual)")
        axis.legend(loc="upper center", ncols=4, fontsize=9, frameon=False, bbox_to_anchor=(0.5, -0.12))
        axis.grid(axis="y", alpha=0.3)
        axis.set_axisbelow(True)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


CSV_FIELDS = (
    "input",
    "version",
    "driver",
    "options",
    "virtual_size",
    "file_size",
    "on_disk",
    "on_disk_pct_of_virtual",
    "diskpipe_allocated",
    "convert_seconds",
    "same_content",
    "rbd_used",
    "rbd_used_exact",
    "upload_seconds",
)


def write_csv(results: list[dict[str, Any]], out: Path) -> None:
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_FIELDS)
        writer.writeheader()
        for result in results:
            virtual = result["virtual_size"]
            for row in result["files"]:
                writer.writerow(
                    {
                        "input": result["name"],
                        **{key: row.get(key) for key in CSV_FIELDS if key in row},
                        "on_disk_pct_of_virtual": round(100 * row["on_disk"] / virtual, 2),
                    }
                )
            for row in result["rbd"]:
                writer.writerow(
                    {
                        "input": result["name"],
                        "version": row["version"],
                        "driver": "raw",
                        "options": row["written_with"],
                        "virtual_size": row["provisioned"],
                        "on_disk_pct_of_virtual": round(100 * row["used"] / virtual, 2),
                        "rbd_used": row["used"],
                        "rbd_used_exact": row["used_exact"],
                        "upload_seconds": round(row["upload_seconds"], 3),
                    }
                )


@contextmanager
def maybe_ceph(enabled: bool, memstore: int) -> Iterator[BenchCeph | None]:
    if not enabled:
        yield None
        return
    with ceph_cluster(memstore_bytes=memstore, port=CEPH_PORT) as ceph:
        yield ceph


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", type=Path, help="images to study (default: the benchmark guest disk)")
    parser.add_argument("--no-rbd", action="store_true", help="skip the Ceph part")
    parser.add_argument("--keep", action="store_true", help="keep the converted versions in benchmarks/work/space/")
    parser.add_argument("--memstore", type=int, default=MEMSTORE_BYTES, help="memstore bytes of the Ceph OSD")
    args = parser.parse_args()

    started = time.perf_counter()
    if args.images:
        inputs = [(path, "given on the command line") for path in args.images]
    else:
        from benchmarks.guest import build

        guest = build(WORK / "guest.raw")
        inputs = [(Path(str(guest["path"])), str(guest["source"]))]
    scratch = WORK / "space"
    results = []
    try:
        with maybe_ceph(not args.no_rbd, args.memstore) as ceph:
            for path, source in inputs:
                print(f"{path}:", file=sys.stderr)
                results.append(study(path, source, ceph, args.memstore, scratch / path.name))
                if not args.keep:
                    # Several 4 GiB-virtual sparse files per input: drop them as we go.
                    shutil.rmtree(scratch / path.name, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.perf_counter() - started

    info = machine()
    markdown = "\n".join(
        [
            *report_head("Space per disk format: file, disk and RBD", info),
            *[markdown_for(result) for result in results],
            NOTES,
            f"Run took {elapsed:.0f} s (`python -m benchmarks.space`).",
            "",
        ]
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_results("space", markdown, {"machine": info, "elapsed_seconds": elapsed, "inputs": results})
    write_csv(results, RESULTS / "space.csv")
    chart(results, RESULTS / "space.png")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
