"""Bare filesystem images (Amazon AMI style): ext4, ext2, XFS, btrfs, squashfs.

Every mkfs gets fixed UUIDs and, where it has a knob for it, a fixed clock.
The files are sparse: mkfs writes only its metadata.
"""

from __future__ import annotations

import os
from pathlib import Path

from samples import tools
from samples.data import EPOCH, FS_UUID, sectors, sparse_file, text_block
from samples.manifest import Sample
from samples.recipe import Context, Recipe, RecipeList

RECIPES = RecipeList()

MIB = 1 << 20


def populate(root: Path) -> Path:
    """A small tree to put into the filesystems (so they are not empty)."""
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "hostname").write_text("diskpipe-sample\n", encoding="ascii")
    (root / "README").write_bytes(text_block(5000, "filesystem readme"))
    for path in [*root.rglob("*"), root]:
        os.utime(path, (EPOCH, EPOCH))  # mkfs -d / -r copy these times into the inodes
    return root


def mkfs_ext(ctx: Context, path: Path, kind: str, *, offset: int = 0, size: int | None = None) -> None:
    """mkfs.ext2/ext4 into `path` (at `offset`, `size` bytes), reproducibly."""
    args = [f"mkfs.{kind}", "-q", "-F", "-U", FS_UUID, "-E", f"hash_seed={FS_UUID},root_owner=0:0"]
    if offset:
        args[-1] += f",offset={offset}"
    tree = populate(ctx.tmp("tree"))
    args += ["-d", str(tree), str(path)]
    if size is not None:
        args.append(f"{size // 1024}k")
    # e2fsprogs reads its clock from E2FSPROGS_FAKE_TIME when set.
    fake_clock = {"E2FSPROGS_FAKE_TIME": str(EPOCH)}
    tools.run(args, env=fake_clock)
    # `-d` copies each source file's ctime, which nobody can set; pin it.
    names = ["/", *sorted("/" + str(p.relative_to(tree)) for p in tree.rglob("*"))]
    script = ctx.tmp("debugfs.cmd")
    script.write_text("".join(f"sif {name} ctime @{EPOCH}\n" for name in names), encoding="ascii")
    device = f"{path}?offset={offset}" if offset else str(path)  # e2fsprogs' io-option syntax
    tools.run(["debugfs", "-w", "-f", str(script), device], env=fake_clock)
    tools.dig_holes(path)


def _sample(name: str, rel: str, path: Path, description: str) -> Sample:
    return Sample(
        name=name,
        file=rel,
        format="raw",
        disk_format="ami",
        contents=["filesystem"],
        virtual_size=sectors(path.stat().st_size),
        allocated=None,  # what mkfs writes (and so the holes) is the tool's business
        description=description,
    )


def _ext(name: str, kind: str, quick: bool = False) -> Recipe:
    def build(ctx: Context) -> Sample:
        rel = f"fs/{name}.img"
        path = sparse_file(ctx.out(rel), 16 * MIB)
        mkfs_ext(ctx, path, kind)
        return _sample(name, rel, path, f"bare {kind} filesystem on a 16 MiB file (superblock magic 0xEF53 at 1080)")

    return Recipe(name, build, quick)


RECIPES += [_ext("ami-ext4", "ext4", quick=True), _ext("ami-ext2", "ext2")]


@RECIPES.add("ami-xfs")
def xfs(ctx: Context) -> Sample:
    rel = "fs/ami-xfs.img"
    path = sparse_file(ctx.out(rel), 300 * MIB)  # mkfs.xfs 6.x refuses less than 300 MiB
    tools.run(["mkfs.xfs", "-q", "-f", "-m", f"uuid={FS_UUID}", str(path)])
    tools.dig_holes(path)  # mkfs.xfs zeroes its 64 MiB log
    return _sample("ami-xfs", rel, path, "bare XFS on a sparse 300 MiB file (XFSB at 0), the smallest mkfs.xfs allows")


@RECIPES.add("ami-btrfs")
def btrfs(ctx: Context) -> Sample:
    rel = "fs/ami-btrfs.img"
    path = sparse_file(ctx.out(rel), 128 * MIB)  # mkfs.btrfs needs about 110 MiB
    tools.run(["mkfs.btrfs", "-q", "-f", "-U", FS_UUID, "-r", str(populate(ctx.tmp("tree"))), str(path)])
    tools.dig_holes(path)
    return _sample("ami-btrfs", rel, path, "bare btrfs on a sparse 128 MiB file (_BHRfS_M at 0x10040)")


@RECIPES.add("ami-squashfs")
def squashfs(ctx: Context) -> Sample:
    rel = "fs/ami-squashfs.img"
    path = ctx.out(rel)
    tree = populate(ctx.tmp("tree"))
    tools.run(
        [
            "mksquashfs",
            str(tree),
            str(path),
            "-quiet",
            "-no-progress",
            "-noappend",
            "-all-root",
            "-mkfs-time",
            str(EPOCH),
            "-all-time",
            str(EPOCH),
        ]
    )
    return _sample("ami-squashfs", rel, path, "squashfs image (hsqs at 0), the read-only root of live systems")
