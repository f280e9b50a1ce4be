"""ISO 9660 images made with pycdlib: plain (with Joliet and Rock Ridge),
El Torito bootable, ISO/UDF bridge, and an isohybrid ISO with an MBR.

qemu calls all of them raw; diskpipe reports disk_format iso. pycdlib stamps
dates from time.time() and draws UDF/isohybrid ids from `random`; both are
frozen while an ISO is built so the bytes do not change between runs.
"""

from __future__ import annotations

import contextlib
import io
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

from samples.data import EPOCH, sectors, seeded, text_block
from samples.manifest import Sample
from samples.recipe import Context, RecipeList, Skip

RECIPES = RecipeList()

_LOCK = threading.Lock()  # the frozen clock is pycdlib-global: one ISO at a time
ISOLINUX_SIGNATURE = b"\xfb\xc0\x78\x70"  # at 0x40 of a boot file: what isohybrid checks for


class _FrozenClock:
    """Stands in for the `time` module inside pycdlib: a fixed `time()`."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def time() -> float:
        return float(EPOCH)


@contextlib.contextmanager
def _frozen_pycdlib() -> Iterator[Any]:
    try:
        import pycdlib
    except ImportError as error:
        raise Skip("pycdlib not installed") from error
    modules = [getattr(pycdlib, name) for name in ("dates", "headervd", "inplaceeditor", "pycdlib", "udf", "utils")]
    with _LOCK, contextlib.ExitStack() as stack:
        for module in modules:
            if hasattr(module, "time"):
                stack.enter_context(mock.patch.object(module, "time", _FrozenClock()))
        stack.enter_context(mock.patch.object(pycdlib.udf, "random", random.Random(1)))
        stack.enter_context(mock.patch.object(pycdlib.isohybrid, "random", random.Random(2)))
        yield pycdlib


def _add_files(iso: Any, udf: bool = False) -> None:
    """Two files, one in a subdirectory, under every name space the ISO has."""
    names: dict[str, Any] = {"rr_name": "data", "joliet_path": "/data"}
    if udf:
        names = {"udf_path": "/data"}
    iso.add_directory("/DATA", **names)
    for iso_path, name, data in (
        ("/README.TXT;1", "readme.txt", text_block(3000, "iso readme")),
        ("/DATA/SAMPLE.BIN;1", "data/sample.bin", seeded(10_000, seed=9)),
    ):
        names = {"rr_name": name.rsplit("/", 1)[-1], "joliet_path": f"/{name}"}
        if udf:
            names = {"udf_path": f"/{name}"}
        iso.add_fp(io.BytesIO(data), len(data), iso_path, **names)


def _boot_file() -> bytes:
    """A 2 KiB no-emulation boot image (4 sectors, as isohybrid requires)
    carrying isolinux's signature where isohybrid looks for it."""
    image = bytearray(text_block(2048, "boot"))
    image[0x40:0x44] = ISOLINUX_SIGNATURE
    return bytes(image)


def _write(ctx: Context, rel: str, make: Callable[[Any], Any]) -> Path:
    path = ctx.out(rel)
    with _frozen_pycdlib() as pycdlib:
        iso = make(pycdlib)
        iso.write(str(path))
        iso.close()
    return path


def _sample(name: str, rel: str, path: Path, description: str, contents: list[str] | None = None) -> Sample:
    return Sample(
        name=name,
        file=rel,
        format="raw",
        disk_format="iso",
        contents=contents or ["iso"],
        virtual_size=sectors(path.stat().st_size),  # qemu: raw, the file size
        allocated=None,  # a tool-made raw file: holes depend on pycdlib's writes
        description=description,
    )


@RECIPES.add("iso-plain", quick=True)
def plain(ctx: Context) -> Sample:
    def make(pycdlib: Any) -> Any:
        iso = pycdlib.PyCdlib()
        iso.new(interchange_level=3, vol_ident="DISKPIPE", joliet=3, rock_ridge="1.09")
        _add_files(iso)
        return iso

    rel = "iso/iso-plain.iso"
    return _sample("iso-plain", rel, _write(ctx, rel, make), "ISO 9660 + Joliet + Rock Ridge with two files")


def _bootable(pycdlib: Any) -> Any:
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident="DISKPIPE_BOOT", joliet=3, rock_ridge="1.09")
    _add_files(iso)
    boot = _boot_file()
    iso.add_fp(io.BytesIO(boot), len(boot), "/BOOT.IMG;1", rr_name="boot.img", joliet_path="/boot.img")
    iso.add_eltorito(
        "/BOOT.IMG;1",
        bootcatfile="/BOOT.CAT;1",
        rr_bootcatname="boot.cat",
        joliet_bootcatfile="/boot.cat",
        boot_load_size=4,
    )
    return iso


@RECIPES.add("iso-eltorito")
def eltorito(ctx: Context) -> Sample:
    rel = "iso/iso-eltorito.iso"
    return _sample(
        "iso-eltorito",
        rel,
        _write(ctx, rel, _bootable),
        "El Torito bootable ISO (no-emulation boot image, boot catalog)",
    )


@RECIPES.add("iso-udf")
def udf(ctx: Context) -> Sample:
    def make(pycdlib: Any) -> Any:
        iso = pycdlib.PyCdlib()
        iso.new(interchange_level=3, vol_ident="DISKPIPE_UDF", udf="2.60")
        _add_files(iso, udf=True)
        return iso

    rel = "iso/iso-udf.iso"
    return _sample(
        "iso-udf", rel, _write(ctx, rel, make), "ISO 9660 / UDF 2.60 bridge (BEA01, NSR03, TEA01 descriptors)"
    )


@RECIPES.add("iso-hybrid")
def hybrid(ctx: Context) -> Sample:
    def make(pycdlib: Any) -> Any:
        iso = _bootable(pycdlib)
        # pycdlib carries isohybrid's MBR boot code itself; it only checks the
        # boot file's signature, so no syslinux package is needed.
        iso.add_isohybrid(mbr_id=0x5A3C1E2B)
        return iso

    rel = "iso/iso-hybrid.iso"
    return _sample(
        "iso-hybrid",
        rel,
        _write(ctx, rel, make),
        "isohybrid ISO: MBR with a partition over the ISO in sector 0, bootable from CD or USB",
        ["iso", "mbr"],
    )
