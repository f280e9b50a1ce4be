"""Plain raw files: odd small sizes, random data, a huge sparse file.

qemu sizes raw files as the file size rounded up to 512; the odd sizes check
that rounding, the 1 TiB sparse file checks that nothing reads the data.
"""

from __future__ import annotations

from samples.data import sectors, seeded, sparse_file
from samples.manifest import Sample
from samples.recipe import Context, Recipe, RecipeList

RECIPES = RecipeList()

TIB = 1 << 40


def _sized(name: str, size: int, description: str, quick: bool = False) -> Recipe:
    def build(ctx: Context) -> Sample:
        rel = f"raw/{name}.raw"
        # Seeded random bytes keep the files identical between runs; the NUL
        # first byte keeps a tiny file from reading as text by chance.
        ctx.out(rel).write_bytes(b"\0" + seeded(size - 1, seed=size) if size else b"")
        return Sample(
            name=name,
            file=rel,
            format="raw",
            disk_format="raw",
            virtual_size=sectors(size),
            allocated=size,  # every byte written; qemu map reports the file bytes
            description=description,
        )

    return Recipe(name, build, quick)


RECIPES += [
    _sized("raw-0b", 0, "empty file: qemu reports raw with virtual size 0", quick=True),
    _sized("raw-1b", 1, "one byte: virtual size rounds up to 512", quick=True),
    _sized("raw-513b", 513, "513 bytes: rounds up to 1024"),
    _sized("raw-4097b", 4097, "4097 bytes: rounds up to 4608", quick=True),
    _sized("raw-1m-random", 1 << 20, "1 MiB of seeded random data: no format magic anywhere"),
]


@RECIPES.add("raw-1t-sparse")
def raw_sparse(ctx: Context) -> Sample:
    rel = "raw/raw-1t-sparse.raw"
    sparse_file(ctx.out(rel), TIB)
    return Sample(
        name="raw-1t-sparse",
        file=rel,
        format="raw",
        disk_format="raw",
        virtual_size=TIB,
        allocated=0,
        description="1 TiB sparse raw file (truncate): huge virtual size, no data, nothing may read it all",
    )
