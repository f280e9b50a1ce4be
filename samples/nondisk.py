"""Uploads that are not disk images at all: tar, OVA, zip, plain text, and
compressed disks (gzip of a qcow2, xz of a raw disk). qemu calls them raw;
an inspector should say what they really are before anyone converts them."""

from __future__ import annotations

import gzip
import io
import lzma
import tarfile
import time
import zipfile

from samples import tools
from samples.data import EPOCH, sparse_file, text_block, written_raw_sample
from samples.manifest import Sample
from samples.recipe import Context, RecipeList
from samples.vmdk import pin_cid

RECIPES = RecipeList()

MIB = 1 << 20

OVF = """<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References><File ovf:id="file1" ovf:href="disk1.vmdk"/></References>
  <DiskSection><Info>Virtual disks</Info>
    <Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="16777216"
          ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="diskpipe-sample"><Info>A sample appliance</Info></VirtualSystem>
</Envelope>
"""


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    """A ustar archive (the format OVA requires) with fixed owners and times."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            member = tarfile.TarInfo(name)
            member.size, member.mtime, member.mode = len(data), EPOCH, 0o644
            archive.addfile(member, io.BytesIO(data))
    return out.getvalue()


def _sample(ctx: Context, name: str, rel: str, data: bytes, kind: str, description: str) -> Sample:
    return written_raw_sample(ctx, name, rel, data, disk_format="raw", contents=[kind], description=description)


@RECIPES.add("tar-archive", quick=True)
def tar(ctx: Context) -> Sample:
    data = _tar([("README", text_block(3000, "tar readme")), ("notes/todo.txt", b"nothing\n")])
    return _sample(ctx, "tar-archive", "other/tar-archive.tar", data, "archive", "ustar archive of two text files")


@RECIPES.add("ova")
def ova(ctx: Context) -> Sample:
    source = sparse_file(ctx.tmp("disk.raw"), 16 * MIB, ((0, 64 * 1024, 0x11),))
    vmdk = ctx.tmp("disk1.vmdk")
    tools.qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", source, vmdk)
    pin_cid(vmdk)
    data = _tar([("sample.ovf", OVF.encode()), ("disk1.vmdk", vmdk.read_bytes())])
    return _sample(
        ctx,
        "ova",
        "other/sample.ova",
        data,
        "archive",
        "OVA: ustar with the .ovf descriptor first, then a streamOptimized vmdk",
    )


@RECIPES.add("zip-archive")
def zip_archive(ctx: Context) -> Sample:
    out = io.BytesIO()
    stamp = time.gmtime(EPOCH)[:6]
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in (("README", text_block(3000, "zip readme")), ("disk.img", bytes(4096))):
            archive.writestr(zipfile.ZipInfo(name, date_time=stamp), data, compress_type=zipfile.ZIP_DEFLATED)
    return _sample(ctx, "zip-archive", "other/zip-archive.zip", out.getvalue(), "archive", "zip archive (PK\\x03\\x04)")


@RECIPES.add("text", quick=True)
def text(ctx: Context) -> Sample:
    data = b"This is not a disk image.\nIt is a plain ASCII text file someone uploaded by mistake.\n" * 20
    return _sample(ctx, "text", "other/text.txt", data, "text", "plain ASCII text")


@RECIPES.add("gzip-qcow2")
def gzip_qcow2(ctx: Context) -> Sample:
    image = ctx.tmp("disk.qcow2")
    tools.create(image, "qcow2", 64 * MIB)
    tools.write(image, "qcow2", ((0, 64 * 1024, 0x11),))
    data = gzip.compress(image.read_bytes(), compresslevel=6, mtime=0)
    return _sample(
        ctx,
        "gzip-qcow2",
        "other/gzip-qcow2.qcow2.gz",
        data,
        "compressed",
        "gzip of a qcow2: a disk image, but not one qemu can open",
    )


@RECIPES.add("xz-raw")
def xz_raw(ctx: Context) -> Sample:
    raw = text_block(MIB, "xz raw disk")
    data = lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64)
    return _sample(
        ctx,
        "xz-raw",
        "other/xz-raw.img.xz",
        data,
        "compressed",
        "xz of a 1 MiB raw disk (same magic as an xz initramfs, no cpio inside)",
    )
