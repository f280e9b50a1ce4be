"""The inspectors against the oracle: for every sample image, what diskpipe
reports equals what `qemu-img info -f <format>` reports, taken live; the
allocation count equals `qemu-img map`; a stream gives the same answer as
the file for any chunk size."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from diskpipe.formats import FormatError, ImageInfo, StreamInspector, inspect
from tests.conftest import qemu_info

FILE_ONLY_FACTS = ("actual_size", "filename", "streamed")


def _comparable(format_specific: dict[str, Any] | None, *, text_descriptor: bool) -> dict[str, Any] | None:
    """qemu prints extent file names as it was given the path; and for a text
    descriptor it opens the extent files, which diskpipe never does, so their
    grain size is not known. Compare the rest."""
    if format_specific is None:
        return None
    data = json.loads(json.dumps(format_specific))
    for extent in data.get("data", {}).get("extents", []):
        extent.pop("filename", None)
        if text_descriptor:
            extent.pop("cluster-size", None)
    return data


def test_facts_equal_qemu_img_info(sample: Any, samples_dir: Path) -> None:
    path = samples_dir / sample.file
    info = inspect(path)
    assert info.format == sample.format
    assert info.virtual_size == sample.virtual_size
    assert info.disk_format == sample.disk_format
    assert sorted(info.content_kinds()) == sorted(set(sample.contents))
    if not sample.qemu_oracle:
        return
    oracle = qemu_info(path, sample.format)
    assert oracle["format"] == info.format
    assert oracle["virtual-size"] == info.virtual_size
    text_descriptor = bool(info.details.get("text-descriptor"))
    if not text_descriptor:
        assert oracle.get("cluster-size") == info.cluster_size
    assert oracle.get("backing-filename") == info.backing_file
    assert oracle.get("backing-filename-format") == info.backing_file_format
    assert oracle.get("encrypted", False) == info.encrypted
    assert oracle.get("dirty-flag") == info.dirty
    if info.format in ("qcow2", "vmdk", "luks"):
        assert _comparable(oracle.get("format-specific"), text_descriptor=text_descriptor) == _comparable(
            info.format_specific, text_descriptor=text_descriptor
        )


def _has_map(info: ImageInfo) -> bool:
    """Allocation is counted from maps inside the image: a VMDK descriptor's
    extents are other files and a fixed VHD has no map."""
    return not (info.details.get("text-descriptor") or (info.format == "vpc" and info.subformat == "fixed"))


def test_allocation_equals_qemu_img_map(sample: Any, samples_dir: Path) -> None:
    path = samples_dir / sample.file
    info = inspect(path, allocation=True)
    if sample.allocated is None or not _has_map(info):
        pytest.skip("qemu-img map has no meaningful count for this image")
    extents = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", "-f", sample.format, str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    mapped = sum(extent["length"] for extent in extents if extent["data"])
    assert info.allocated_size == mapped == sample.allocated


def _facts(info: ImageInfo) -> dict[str, Any]:
    facts = info._asdict()
    for key in FILE_ONLY_FACTS:
        facts.pop(key)
    return facts


def _streamed(path: Path, chunk: int) -> ImageInfo:
    inspector = StreamInspector(allocation=True)
    with path.open("rb") as handle:
        while data := handle.read(chunk):
            inspector.feed(data)
    return inspector.finish()


@pytest.mark.parametrize("chunk", [17, 512, 65536, 1 << 20, 1])
def test_stream_gives_the_same_facts_as_the_file(sample: Any, samples_dir: Path, chunk: int) -> None:
    path = samples_dir / sample.file
    size = path.stat().st_size
    # Tiny chunks cost a Python call each: keep them to small files (the
    # reading logic is the same whatever the file size).
    limit = {1: 256 << 10, 17: 2 << 20, 512: 64 << 20}.get(chunk, 2 << 30)
    if size >= limit:
        pytest.skip(f"{chunk}-byte chunks only for samples under {limit} bytes")
    from_file = inspect(path, allocation=True)
    streamed = _streamed(path, chunk)
    assert streamed.streamed
    expected = _facts(from_file)
    if from_file.format == "raw":
        # Raw data has no allocation table: the count comes from the
        # filesystem's holes, a fact only a file has.
        expected["allocated_size"] = None
    assert _facts(streamed) == expected


def test_file_objects_answer_like_paths(samples_dir: Path, manifest: list[Any]) -> None:
    for entry in manifest[:40]:
        path = samples_dir / entry.file
        with path.open("rb") as handle:
            assert _facts(inspect(handle)) == _facts(inspect(path))


def test_a_dmg_is_known_by_name_only_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "blank.dmg"
    path.write_bytes(bytes(4096))
    assert inspect(path).format == "dmg"
    assert inspect(path).matches == ("dmg",)
    with path.open("rb") as handle:
        assert _streamed(path, 1024).format == "raw"
        assert handle.read(4) == bytes(4)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"QFI\xfb\x00\x00\x00\x03" + bytes(20), "qcow2: header truncated"),
        (b"vhdxfile" + bytes(100), "vhdx: no valid VHDX header"),
        (b"conectix" + bytes(504), "vpc: incorrect header checksum"),
        (b"QED\x00" + bytes(60), "qed: invalid cluster size"),
        (b"LUKS\xba\xbe\x00\x01" + bytes(584), "luks: unsupported cipher"),
    ],
)
def test_broken_headers_raise_the_documented_error(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "broken"
    path.write_bytes(data)
    with pytest.raises(FormatError, match=message) as failure:
        inspect(path)
    assert isinstance(failure.value, ValueError)


def _cowd(descriptor: bytes) -> bytes:
    header = struct.pack("<4sIIIIIII", b"COWD", 1, 3, 2048, 8, 4, 1, 2048)
    return header + bytes(512 - len(header)) + descriptor + bytes(3584 - len(descriptor))


def _sparse_without_cid(tmp_path: Path) -> bytes:
    made = tmp_path / "made.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(made), "1M"], check=True)
    image = bytearray(made.read_bytes())
    text = b'# Disk DescriptorFile\nversion=1\ncreateType="monolithicSparse"\nRW 2048 SPARSE "made.vmdk"\n'
    image[512 : 512 + 10240] = text + bytes(10240 - len(text))
    return bytes(image)


@pytest.mark.parametrize(
    "make",
    [
        lambda tmp_path: _cowd(b""),
        lambda tmp_path: _cowd(b"CID=12345678\n"),
        _sparse_without_cid,
        # qemu opens the extent (here the descriptor itself) before it looks for the CIDs.
        lambda tmp_path: b'# Disk DescriptorFile\nversion=1\nCID=1\ncreateType="vmfs"\nRW 8 VMFS "image.vmdk"\n',
    ],
    ids=["cowd-no-text", "cowd-no-parent-cid", "sparse-no-cid", "descriptor-no-parent-cid"],
)
def test_a_vmdk_without_cid_and_parent_cid_is_broken_as_qemu_says(tmp_path: Path, make: Any) -> None:
    path = tmp_path / "image.vmdk"
    path.write_bytes(make(tmp_path))
    refused = subprocess.run(["qemu-img", "info", "-f", "vmdk", str(path)], capture_output=True, text=True, check=False)
    assert refused.returncode != 0 and "Invalid argument" in refused.stderr
    with pytest.raises(FormatError, match="no CID and parentCID"):
        inspect(path)
    with pytest.raises(FormatError, match="no CID and parentCID"):
        _streamed(path, 512)


def test_a_cowd_parent_hint_is_its_backing_file_for_file_and_stream(tmp_path: Path) -> None:
    path = tmp_path / "delta.vmdk"
    path.write_bytes(_cowd(b'CID=1\nparentCID=ffffffff\nparentFileNameHint="base-flat.vmdk"\n'))
    oracle = qemu_info(path, "vmdk")
    for info in (inspect(path), _streamed(path, 17)):
        assert (info.backing_file, info.backing_file_format) == ("base-flat.vmdk", "vmdk")
        assert (oracle["backing-filename"], oracle["backing-filename-format"]) == ("base-flat.vmdk", "vmdk")


def test_an_extent_name_past_qemus_511_characters_is_read_as_qemu_reads_it(tmp_path: Path) -> None:
    """qemu's sscanf keeps the first 511 characters of an extent name with
    no closing quote there and opens that file: diskpipe must see the same
    extent (and the policy refuses it), not a descriptor without extents."""
    from diskpipe.formats import inspect
    from diskpipe.formats.policy import Policy, check

    target = "etc/hostname"
    name = "/" + "./" * ((511 - 1 - len(target)) // 2) + target
    name = name.rjust(511, "/")
    path = tmp_path / "long.vmdk"
    path.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        f'createType="monolithicFlat"\nRW 2048 VMFS "{name}EXTRA"\n'
    )
    info = inspect(path)
    assert info.virtual_size == qemu_info(path, "vmdk")["virtual-size"] == 1 << 20
    relaxed = Policy(vmdk_create_types=frozenset({"monolithicSparse", "streamOptimized", "monolithicFlat"}))
    assert "vmdk_extents" in {issue.check for issue in check(info, relaxed).issues}
