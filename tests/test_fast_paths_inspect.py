"""The fast paths of the in-process inspection give the answers of the
slower code they stand in for: checksums fed in parts, a fixed VHD footer
parsed once, the VMDK text probe's and the ramdisk sniff's screens, the
VMDK descriptor's strict reading of the compared keys alone, block scans in
place, qcow2's one-call header and its overlap pairs, the usual embedded
descriptor not read twice. Each test holds the fast path against the plain
computation, so a screen that drops a case fails here."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diskpipe.formats import crc, detect, inspect, qcow2, ramdisk, registry, vmdk, vmdk_descriptor, vpc
from diskpipe.formats.base import PROBE_SIZE
from diskpipe.formats.errors import FormatError
from diskpipe.formats.layout import nonzero_from
from diskpipe.formats.reads import run_on_reader


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=8, max_size=9000), field=st.integers(0, 7))
def test_a_checksum_fed_in_parts_is_the_checksum_of_the_joined_bytes(data: bytes, field: int) -> None:
    start, end = field, field + 4 if field + 4 <= len(data) else len(data)
    joined = data[:start] + bytes(end - start) + data[end:]
    assert crc.crc32c_zeroed(data, start, end) == crc.crc32c(joined) == crc._crc32c_python(joined)


def test_a_checksum_fed_in_parts_without_the_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytes(range(256)) * 40
    expected = crc._crc32c_python(data[:4] + bytes(4) + data[8:])
    monkeypatch.setitem(crc._loaded, "module", None)
    assert crc.crc32c_zeroed(data, 4, 8) == expected


def _vhd_footer(disk_type: int, creator: bytes = b"qemu", size: int = 10 << 20) -> bytes:
    footer = bytearray(512)
    struct.pack_into(">8sIIQI4sI4sQQHBBI", footer, 0, b"conectix", 2, 0x10000, 0xFFFFFFFFFFFFFFFF, 0,
                     creator, 0x50003, b"Wi2k", size, size, 1000, 16, 63, disk_type)  # fmt: skip
    struct.pack_into(">I", footer, 64, vpc.checksum(bytes(footer)))
    return bytes(footer)


@settings(max_examples=300, deadline=None)
@given(
    disk_type=st.sampled_from([2, 3, 4]),
    creator=st.sampled_from([b"qemu", b"win ", b"vpc "]),
    flips=st.lists(st.tuples(st.integers(0, 511), st.integers(0, 255)), max_size=2),
    lead=st.binary(max_size=40),
)
def test_a_fixed_footer_parsed_once_gives_the_facts_of_parsing_it_again(
    disk_type: int, creator: bytes, flips: list[tuple[int, int]], lead: bytes
) -> None:
    tail = bytearray(lead + _vhd_footer(disk_type, creator))
    for position, value in flips:
        tail[len(lead) + position] = value
    tail_bytes = bytes(tail)
    footer = vpc.fixed_footer(tail_bytes)
    raw = tail_bytes[-512:]
    # The slow test: the cookie, a fixed disk, a good checksum.
    try:
        parsed = vpc.parse_footer(raw, 0)
        valid = parsed["disk_type"] == vpc.DISK_FIXED
    except FormatError:
        valid = False
    assert (footer is not None) == valid
    if footer is not None:
        size = 20 << 20
        try:
            expected: Any = vpc.fixed_facts(tail_bytes, size)
        except FormatError as error:
            expected = str(error)
        try:
            got: Any = vpc.fixed_facts(tail_bytes, size, footer)
        except FormatError as error:
            got = str(error)
        assert got == expected


def _eager_probe(data: bytes) -> list[str]:
    buffer = data[:PROBE_SIZE].ljust(PROBE_SIZE, b"\0")
    return [container.name for container in registry.all_containers() if container.probe(buffer)]


def test_the_vmdk_text_probe_is_screened_by_its_first_byte_alone() -> None:
    """Every first byte before a version line: the screen may skip the
    search only where qemu's text probe refuses too."""
    bodies = [b"version=1\n", b"version=2\r\n", b"\nversion=3\n", b" \r\nversion=1\n", b"ersion=1\n"]
    for first in range(256):
        for body in bodies:
            for data in (bytes([first]) + body, bytes([first]) * 3 + body, bytes([first]) + b"\n" + body):
                assert [fmt.name for fmt in registry.probe_containers(data)] == _eager_probe(data), data


# Every cpio and compression magic the ramdisk sniff knows (and no magic).
MAGICS = [
    b"070701", b"070707", b"\xc7\x71", b"\x71\xc7", b"\x1f\x8b", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd",
    b"\x02\x21\x4c\x18", b"\x04\x22\x4d\x18", b"BZh91AY&SY", b"\x5d\x00\x00", b"\x89LZO\x00\r\n\x1a\n", b"",
]  # fmt: skip


@settings(max_examples=600, deadline=None)
@given(
    magic=st.sampled_from(MAGICS),
    cut=st.integers(0, 10),
    noise=st.binary(max_size=24),
)
def test_the_magic_screen_never_hides_a_cpio_or_a_compressed_stream(magic: bytes, cut: int, noise: bytes) -> None:
    head = magic[:cut] + noise if cut < len(magic) else magic + noise
    slow = ramdisk.is_cpio(head) or ramdisk._algorithm(head) is not None
    assert ramdisk.may_hold_magic(head) or not slow
    assert detect._may_be_compressed(head) == slow


_KEYS = [b"createType", b"CID", b"parentCID", b"parentFileNameHint", b"ddb.adapterType", b"version"]
_VALUES = [b'"monolithicSparse"', b'"vmfs"', b"5a3c1e2b", b"ffffffff", b"zz", b'"a b.vmdk"', b'"x', b"", b'""']


def _strict_disagreements(text: bytes, descriptor: vmdk_descriptor.Descriptor) -> list[str]:
    """The old reading: every key=value line decoded, the first of a key kept."""
    key_value = vmdk_descriptor._patterns()[2]
    values: dict[str, str] = {}
    for raw_line in text.split(b"\0")[0].split(b"\n"):
        pair = key_value.match(raw_line.rstrip(b"\r"))
        if pair:
            key, value = pair.groups()
            values.setdefault(key.decode(), value.strip(b'"').decode("utf-8", "backslashreplace"))
    out = vmdk_descriptor.Descriptor(0)
    out.create_type, out.cid, out.parent_hint = descriptor.create_type, descriptor.cid, descriptor.parent_hint
    vmdk_descriptor._note_disagreements(out, {key.encode(): value for key, value in values.items()})
    return out.disagreements


@settings(max_examples=400, deadline=None)
@given(
    lines=st.lists(
        st.one_of(
            st.tuples(st.sampled_from(_KEYS), st.sampled_from([b"=", b" = ", b"\t=  "]), st.sampled_from(_VALUES)).map(
                b"".join
            ),
            st.sampled_from([b"# comment = x", b"", b'RW 100 SPARSE "a.vmdk"', b"junk line", b"  \r"]),
        ),
        max_size=12,
    )
)
def test_descriptor_disagreements_are_those_of_reading_every_pair(lines: list[bytes]) -> None:
    text = b"\n".join(lines)
    descriptor = vmdk_descriptor.parse(text)
    assert descriptor.disagreements == _strict_disagreements(text, descriptor)


@settings(max_examples=400, deadline=None)
@given(
    length=st.integers(0, 13000),
    marks=st.lists(st.floats(0, 1, exclude_max=True), max_size=2),
    start=st.floats(0, 1.1),
)
def test_nonzero_from_on_long_data_is_any(length: int, marks: list[float], start: float) -> None:
    data = bytearray(length)
    for mark in marks:
        if length:
            data[int(mark * length)] = 1
    begin = int(start * length) - 1
    assert nonzero_from(bytes(data), begin) == any(data[max(0, begin) :])


@settings(max_examples=400, deadline=None)
@given(
    version=st.integers(1, 5),
    length=st.integers(40, 140),
    body=st.binary(min_size=140, max_size=140),
)
def test_a_qcow2_header_parsed_in_one_call_is_the_two_parses_merged(version: int, length: int, body: bytes) -> None:
    head = (qcow2.MAGIC + version.to_bytes(4, "big") + body)[:length]

    def two_parses() -> Any:
        header = qcow2.HEADER_V2.parse(head)
        if header["version"] >= 3:
            header.update(qcow2.HEADER_V3.parse(head))
        else:
            header.update(incompatible_features=0, compatible_features=0, autoclear_features=0, refcount_order=4)
        return list(header.items())

    try:
        expected: Any = two_parses()
    except FormatError as error:
        expected = str(error)
    try:
        got: Any = list(qcow2._parse_header(head, [])[0].items())
    except FormatError as error:
        got = str(error)
    assert got == expected


@settings(max_examples=300, deadline=None)
@given(
    l1=st.tuples(st.integers(0, 1 << 20), st.integers(0, 4)),
    refcount=st.tuples(st.integers(0, 1 << 20), st.integers(0, 3)),
    snapshots=st.tuples(st.integers(0, 1 << 20), st.integers(0, 2)),
)
def test_metadata_overlaps_are_every_overlapping_pair_in_order(
    l1: tuple[int, int], refcount: tuple[int, int], snapshots: tuple[int, int]
) -> None:
    cluster = 65536
    header = {
        "l1_table_offset": l1[0] * 512, "l1_size": l1[1] * 4096, "refcount_table_offset": refcount[0] * 512,
        "refcount_table_clusters": refcount[1], "snapshots_offset": snapshots[0] * 512, "nb_snapshots": snapshots[1],
    }  # fmt: skip
    ranges = [("header", 0, cluster)]
    if header["l1_size"]:
        ranges.append(("L1 table", header["l1_table_offset"], header["l1_size"] * 8))
    if header["refcount_table_clusters"]:
        ranges.append(("refcount table", header["refcount_table_offset"], header["refcount_table_clusters"] * cluster))
    if header["nb_snapshots"]:
        ranges.append(("snapshot table", header["snapshots_offset"], cluster))
    spans = [(name, start // cluster, -(-(start + length) // cluster)) for name, start, length in ranges]
    expected = [
        f"{a[0]} overlaps {b[0]}"
        for index, a in enumerate(spans)
        for b in spans[index + 1 :]
        if a[1] < b[2] and b[1] < a[2]
    ]
    anomalies: list[dict[str, str]] = []
    qcow2._check_overlap(header, cluster, anomalies)
    assert [anomaly["message"] for anomaly in anomalies] == expected


def test_the_usual_embedded_descriptor_is_read_once_and_read_as_its_region(
    samples_dir: Path, manifest: list[Any]
) -> None:
    """A sparse VMDK whose descriptor region is the 10 KiB qemu reads: no
    second read of it, and the facts those bytes give when parsed again."""
    checked = 0
    for entry in manifest:
        path = samples_dir / entry.file
        if entry.format != "vmdk":
            continue
        with path.open("rb") as image:
            data = image.read(1 << 20)
        if data[:4] != vmdk.MAGIC_VMDK4:
            continue
        header = vmdk.HEADER.parse(data)
        if header["descriptor_offset"] != 1 or header["descriptor_size"] * 512 != vmdk.EMBEDDED_DESCRIPTOR_READ:
            continue
        calls: list[tuple[int, int]] = []

        def read_at(offset: int, length: int, path: Path = path, calls: list[tuple[int, int]] = calls) -> bytes:
            calls.append((offset, length))
            with path.open("rb") as image:
                image.seek(offset)
                return image.read(length)

        info = run_on_reader(detect.inspection(detect.InspectOptions()), read_at, path.stat().st_size, head_read=0)
        region = data[512 : 512 + vmdk.EMBEDDED_DESCRIPTOR_READ]
        assert info.details["descriptor"] == vmdk_descriptor.parse(region).to_json(), entry.name
        assert calls.count((512, vmdk.EMBEDDED_DESCRIPTOR_READ)) == 0, entry.name  # cut from the head
        assert info == inspect(path)._replace(actual_size=None, filename=None), entry.name
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("sectors", [19, 20, 21])
def test_an_embedded_descriptor_region_of_another_size_is_read_as_that_region(
    samples_dir: Path, manifest: list[Any], tmp_path: Path, sectors: int
) -> None:
    """Text running past 19 sectors: a region of 19 sectors holds less of it
    than the 10 KiB qemu reads (and the strict reading says so), 20 sectors
    are those 10 KiB, 21 hold all of it too."""
    entry = next(entry for entry in manifest if entry.name == "vmdk-monolithic-sparse")
    with (samples_dir / entry.file).open("rb") as image:
        data = bytearray(image.read())
    text = bytes(data[512 : 512 + vmdk.EMBEDDED_DESCRIPTOR_READ]).split(b"\0")[0]
    text += b"# padding\n" * ((9800 - len(text)) // 10)
    data[512 : 512 + vmdk.EMBEDDED_DESCRIPTOR_READ] = text.ljust(vmdk.EMBEDDED_DESCRIPTOR_READ, b"\0")
    struct.pack_into("<Q", data, 36, sectors)  # descriptor_size
    path = tmp_path / "padded.vmdk"
    path.write_bytes(bytes(data))
    described = inspect(path).details["descriptor"]
    assert described["bytes"] == min(len(text), sectors * 512)
    expected = vmdk_descriptor.parse(bytes(data[512 : 512 + sectors * 512]))
    # Text qemu reads past a short region is hidden from the strict reading.
    expected.hidden_text = expected.hidden_text or sectors * 512 < len(text)
    assert described == expected.to_json()


def test_fixed_vhd_samples_are_found_by_the_footer_parsed_once(samples_dir: Path, manifest: list[Any]) -> None:
    fixed = [entry for entry in manifest if entry.format == "vpc" and "fixed" in entry.name and entry.group == "honest"]
    assert fixed
    for entry in fixed:
        info = inspect(samples_dir / entry.file)
        assert info.format == "vpc" and info.subformat == "fixed", entry.name
        with (samples_dir / entry.file).open("rb") as image:
            image.seek(-512, 2)
            tail = image.read()
        assert vpc.fixed_footer(tail) is not None, entry.name
        assert info.virtual_size == vpc.fixed_facts(tail, info.file_size).virtual_size, entry.name
