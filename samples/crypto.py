"""LUKS containers: qemu's own `luks` driver format, and cryptsetup's LUKS1
and LUKS2 (qemu 7.2 reads only version 1; LUKS2 is raw to it).

Key derivation is deliberately cheap (10 ms / 1000 PBKDF2 iterations):
these samples are for inspection, not for keeping secrets. Salts and master
keys are random whatever we do, so these files differ between runs.
"""

from __future__ import annotations

from samples import tools
from samples.data import DISK_UUID, SECRET, sparse_file
from samples.manifest import Sample
from samples.recipe import Context, RecipeList

RECIPES = RecipeList()

MIB = 1 << 20
LUKS1_PAYLOAD_SECTORS = 4096  # --align-payload: cryptsetup's usual 2 MiB header area


@RECIPES.add("luks-qemu", quick=True)
def qemu_luks(ctx: Context) -> Sample:
    rel = "luks/luks-qemu.luks"
    path = ctx.out(rel)
    size = 16 * MIB
    tools.create(path, "luks", size, "key-secret=s0,iter-time=10", "--object", f"secret,id=s0,data={SECRET}")
    return Sample(
        name="luks-qemu",
        file=rel,
        format="luks",
        disk_format="luks",
        virtual_size=size,  # qemu sizes it as the payload after its header
        allocated=None,  # map needs the key; the payload is ciphertext anyway
        description="LUKS1 made by qemu-img create -f luks (iter-time 10 ms): format luks",
    )


def _cryptsetup(ctx: Context, rel: str, version: str, *extra: str) -> None:
    path = sparse_file(ctx.out(rel), 32 * MIB)
    key = ctx.tmp("key")
    key.write_text(SECRET, encoding="ascii")
    tools.run(
        [
            "cryptsetup",
            "luksFormat",
            "--batch-mode",
            f"--type={version}",
            "--pbkdf=pbkdf2",
            "--pbkdf-force-iterations=1000",
            f"--uuid={DISK_UUID}",
            f"--key-file={key}",
            *extra,
            path,
        ]
    )
    tools.dig_holes(path)  # only the headers were written


@RECIPES.add("luks1-cryptsetup")
def luks1(ctx: Context) -> Sample:
    rel = "luks/luks1-cryptsetup.img"
    _cryptsetup(ctx, rel, "luks1", f"--align-payload={LUKS1_PAYLOAD_SECTORS}")
    return Sample(
        name="luks1-cryptsetup",
        file=rel,
        format="luks",
        disk_format="luks",
        virtual_size=32 * MIB - LUKS1_PAYLOAD_SECTORS * 512,
        allocated=None,
        description="LUKS1 made by cryptsetup on a 32 MiB file: qemu sizes it as file minus payload offset",
    )


@RECIPES.add("luks2-cryptsetup")
def luks2(ctx: Context) -> Sample:
    rel = "luks/luks2-cryptsetup.img"
    # cryptsetup fills the keyslot area with random bytes: keep it at the 256 KiB
    # one AES-XTS-512 keyslot needs (4000 stripes x 64 bytes) instead of 16 MiB.
    _cryptsetup(ctx, rel, "luks2", "--luks2-keyslots-size=256k")
    return Sample(
        name="luks2-cryptsetup",
        file=rel,
        format="raw",
        disk_format="raw",
        contents=["luks"],
        virtual_size=32 * MIB,
        allocated=None,  # a tool-made raw file: its holes are cryptsetup's business
        description="LUKS2 made by cryptsetup: qemu 7.2 has no LUKS2 probe, so it is raw (content luks)",
    )
