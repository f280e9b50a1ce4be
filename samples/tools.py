"""Running the external tools (qemu-img, qemu-io, mkfs, ...) the recipes use."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from samples.recipe import Skip

Write = tuple[int, int, int]  # (offset, length, byte pattern) for `qemu-io write -P`

# Tools see a fixed clock zone and locale so what they print and stamp does not
# depend on the machine that runs the generator.
_ENV = {**os.environ, "TZ": "UTC", "LC_ALL": "C"}


def require(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise Skip(f"{tool} not installed")
    return found


def run(
    args: Sequence[str | os.PathLike[str]],
    *,
    stdin: bytes | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> bytes:
    """Run a command; raise with its stderr if it fails; return its stdout."""
    argv = [os.fspath(arg) for arg in args]
    require(argv[0])
    result = subprocess.run(
        argv,
        input=stdin,
        cwd=cwd,
        env={**_ENV, **(env or {})},
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {message}")
    return result.stdout


def qemu_img(*args: str | os.PathLike[str]) -> bytes:
    return run(["qemu-img", *args])


def create(path: Path, fmt: str, size: int, options: str = "", *extra: str) -> None:
    """`qemu-img create` quietly, with `-o options` when given."""
    args: list[str | os.PathLike[str]] = ["create", "-q", "-f", fmt]
    if options:
        args += ["-o", options]
    qemu_img(*args, *extra, path, str(size))


def write(path: Path | str, fmt: str, writes: Iterable[Write], *opts: str) -> None:
    """Put real data into an image with qemu-io, one `write -P` per extent.

    `opts` go before the file name (e.g. `--object ... --image-opts`); when
    they contain `--image-opts`, `path` is an option string, not a file.
    """
    commands: list[str] = []
    for offset, length, pattern in writes:
        commands += ["-c", f"write -P 0x{pattern:02x} {offset} {length}"]
    if not commands:
        return
    fmt_args = [] if "--image-opts" in opts else ["-f", fmt]
    run(["qemu-io", *fmt_args, *opts, *commands, path])


def info(path: Path, fmt: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(qemu_img("info", "--output=json", "-f", fmt, path))
    return result


def mapped_data(path: Path, fmt: str) -> int:
    """Guest bytes `qemu-img map` reports as data."""
    extents = json.loads(qemu_img("map", "--output=json", "-f", fmt, path))
    return sum(extent["length"] for extent in extents if extent["data"])


def covered(writes: Iterable[Write], granule: int, limit: int) -> int:
    """Bytes of the union of the writes, each widened to whole `granule`s:
    what an allocation map reports after those writes."""
    spans = sorted(
        ((offset // granule) * granule, min(limit, -(-(offset + length) // granule) * granule))
        for offset, length, _ in writes
    )
    total = 0
    end = 0
    for start, stop in spans:
        begin = max(start, end)
        if stop > begin:
            total += stop - begin
            end = stop
    return total


def dig_holes(path: Path) -> None:
    """Rewrite a file with holes for its blocks of zeros (same bytes, less
    disk): mkfs.xfs, cryptsetup and qemu's copy-on-write of big clusters
    write or preallocate many zeros. `fallocate --dig-holes` is not enough:
    it skips preallocated (unwritten) extents, which still take disk space."""
    sparse = path.with_name(path.name + ".sparse")
    run(["cp", "--sparse=always", path, sparse])
    os.replace(sparse, path)
