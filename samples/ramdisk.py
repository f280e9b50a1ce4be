"""Ramdisks (Amazon ARI): a newc cpio initramfs and that cpio compressed
with every algorithm the kernel unpacks (gzip, xz, zstd, lz4 legacy and
frame, bzip2)."""

from __future__ import annotations

import os
from pathlib import Path

from samples import tools
from samples.data import EPOCH, text_block, written_raw_sample
from samples.manifest import Sample
from samples.recipe import Context, Recipe, RecipeList

RECIPES = RecipeList()

INIT = b"#!/bin/sh\nmount -t proc proc /proc\necho diskpipe sample initramfs\nexec /bin/sh\n"


def initramfs(ctx: Context) -> bytes:
    """`cpio -o -H newc` of a tiny tree with fixed times and owners."""
    root = ctx.tmp("initramfs")
    files: dict[str, bytes] = {
        "init": INIT,
        "etc/hostname": b"diskpipe-sample\n",
        "etc/motd": text_block(2000, "initramfs motd"),
        "bin/README": b"busybox would live here\n",
    }
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "init").chmod(0o755)
    (root / "proc").mkdir()
    names = sorted(str(path.relative_to(root)) for path in root.rglob("*"))
    for name in [*names, "."]:
        os.utime(root / name, (EPOCH, EPOCH))
    listing = ("\n".join(names) + "\n").encode()
    return tools.run(
        ["cpio", "-o", "-H", "newc", "--reproducible", "-R", "0:0", "--quiet"], stdin=listing, cwd=Path(root)
    )


# name suffix, compressor command (stdin → stdout), description
COMPRESSORS: tuple[tuple[str, list[str] | None, str], ...] = (
    ("cpio", None, "uncompressed newc cpio (070701)"),
    ("cpio-gzip", ["gzip", "-9", "-n", "-c"], "gzip-compressed cpio (1f 8b)"),
    ("cpio-xz", ["xz", "--check=crc32", "-c"], "xz-compressed cpio with CRC32 check, as the kernel needs"),
    ("cpio-zstd", ["zstd", "-q", "-19", "-c"], "zstd-compressed cpio (28 b5 2f fd)"),
    (
        "cpio-lz4-legacy",
        ["lz4", "-q", "-l", "-9", "-c"],
        "lz4 legacy format (02 21 4c 18), what the kernel's lz4 initramfs uses",
    ),
    ("cpio-lz4-frame", ["lz4", "-q", "-9", "-c"], "lz4 frame format (04 22 4d 18)"),
    ("cpio-bzip2", ["bzip2", "-9", "-c"], "bzip2-compressed cpio (BZh)"),
)


def _recipe(suffix: str, command: list[str] | None, description: str) -> Recipe:
    name = f"ari-{suffix}"

    def build(ctx: Context) -> Sample:
        data = initramfs(ctx)
        if command is not None:
            data = tools.run(command, stdin=data)
        return written_raw_sample(
            ctx,
            name,
            f"ramdisk/{name}.img",
            data,
            disk_format="ari",
            contents=["ramdisk"],
            description=f"initramfs: {description}",
        )

    return Recipe(name, build, quick=suffix in {"cpio", "cpio-gzip"})


RECIPES += [_recipe(*entry) for entry in COMPRESSORS]
