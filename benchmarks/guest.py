"""A realistic guest disk for the benchmarks: a 4 GiB raw disk with a GPT and
one ext4 partition holding a Debian minbase (debootstrap), or, when the
Debian archive cannot be reached, an equivalent tree copied from this
machine (/usr/lib, /usr/share...) so the benchmarks still run offline.

No loop device or mount is needed: the filesystem is made from a directory
(`mkfs.ext4 -d`) in a partition-sized file and copied into the disk at the
partition's offset, sparsely.

    python -m benchmarks.guest [--size 4G] [--out benchmarks/work/guest.raw]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.common import WORK

DEFAULT_SIZE = 4 << 30
PARTITION_START = 1 << 20  # sector 2048
FALLBACK_TREES = ("/usr/lib/python3", "/usr/share/doc", "/usr/share/locale", "/usr/lib/x86_64-linux-gnu", "/usr/bin")
FALLBACK_BYTES = 300 << 20


def _run(args: list[str], **kwargs: object) -> None:
    subprocess.run(args, check=True, capture_output=True, **kwargs)  # type: ignore[call-overload]


def debootstrap(target: Path) -> bool:
    if shutil.which("debootstrap") is None:
        return False
    result = subprocess.run(
        ["debootstrap", "--variant=minbase", "bookworm", str(target), "http://deb.debian.org/debian"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode == 0


def fallback_tree(target: Path) -> None:
    """Copy host files until FALLBACK_BYTES: a mix of binaries, libraries and text."""
    copied = 0
    for tree in FALLBACK_TREES:
        for root, _, files in os.walk(tree):
            for name in files:
                source = Path(root) / name
                if not source.is_file() or source.is_symlink():
                    continue
                destination = target / source.relative_to("/")
                destination.parent.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.copyfile(source, destination)
                except OSError:
                    continue
                copied += source.stat().st_size
                if copied >= FALLBACK_BYTES:
                    return


def build(out: Path, size: int = DEFAULT_SIZE) -> dict[str, object]:
    """Build the disk at `out` (once; an existing one is reused)."""
    meta = out.with_suffix(".source")
    if out.exists() and meta.exists():
        return {"path": str(out), "source": meta.read_text().strip()}
    work = out.parent / "guest-build"
    shutil.rmtree(work, ignore_errors=True)
    rootfs = work / "rootfs"
    rootfs.mkdir(parents=True)
    source = "debian bookworm minbase (debootstrap)"
    if not debootstrap(rootfs):
        shutil.rmtree(rootfs, ignore_errors=True)
        rootfs.mkdir()
        fallback_tree(rootfs)
        source = "host files (no network for debootstrap)"
    partition_size = size - PARTITION_START - (1 << 20)
    filesystem = work / "part.ext4"
    with filesystem.open("wb") as handle:
        handle.truncate(partition_size)
    _run(["mkfs.ext4", "-q", "-F", "-d", str(rootfs), "-L", "guestroot", str(filesystem)])
    disk = out.with_suffix(".tmp")
    with disk.open("wb") as handle:
        handle.truncate(size)
    _run(["sgdisk", "-n", f"1:{PARTITION_START // 512}:+{partition_size // 512}", "-t", "1:8300", str(disk)])
    _run(["dd", f"if={filesystem}", f"of={disk}", "bs=1M", f"seek={PARTITION_START >> 20}", "conv=notrunc,sparse"])
    disk.rename(out)
    meta.write_text(source + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return {"path": str(out), "source": source}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=WORK / "guest.raw")
    parser.add_argument("--size", default="4G")
    args = parser.parse_args()
    from diskpipe.config import parse_size

    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(build(args.out, parse_size(args.size)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
