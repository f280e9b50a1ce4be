"""The inspectors' fast paths give the answers they promise: the text sniff
its 98 % printable rule, the lz4 decoder what the lz4 tool packed, the
byte scans what any() and rstrip() say, the signature lookup what every
probe says."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diskpipe.formats import inspect, layout, nondisk, qcow2, ramdisk, registry, vhdx, vmdk_descriptor
from diskpipe.formats.api import StreamInspector, inspect_reader
from diskpipe.formats.base import PROBE_SIZE
from diskpipe.formats.detect import FIRST_READ, sniff_contents
from diskpipe.formats.layout import entries_in_use, nonzero_from
from diskpipe.formats.reads import HEAD_RETAIN, Read

# Characters str.isprintable() accepts, the whitespace controls text holds,
# and characters no text sniff may count as printable (C0 and C1 controls,
# DEL, a zero-width space, a no-break space, a private-use character).
PRINTABLE = st.one_of(
    st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"), blacklist_characters="\0"),
    st.sampled_from(" \n\r\t\f\v"),
)
UNPRINTABLE = st.sampled_from(["\x01", "\x11", "\x1b", "\x7f", "\x85", "\u200b", "\u00a0", "\ue000"])


@settings(max_examples=600, deadline=None)
@given(
    text=st.text(alphabet=PRINTABLE, min_size=1, max_size=600),
    unprintable=st.lists(st.tuples(st.integers(0, 600), UNPRINTABLE), max_size=20),
)
def test_text_is_what_is_at_least_98_percent_printable(text: str, unprintable: list[tuple[int, str]]) -> None:
    for position, char in unprintable:
        text = text[:position] + char + text[position:]
    head = text.encode()
    assert len(head) <= nondisk.TEXT_SAMPLE
    found = nondisk._text(head)
    if len(unprintable) > len(text) * 0.02:
        assert found is None
    else:
        assert found is not None
        assert found.details["first-line"] == text.split("\n", 1)[0][:80]


def test_text_sniff_sample_edges() -> None:
    # A character cut by the end of the sample is still text; a broken one inside it is not.
    cut = ("a" * (nondisk.TEXT_SAMPLE - 1) + "\u00e9").encode()
    assert nondisk._text(cut) is not None
    assert nondisk._text(b"text with one \xff byte") is None
    assert nondisk._text(b"text\0with a NUL") is None
    assert nondisk._text(b"") is None


def test_text_sniff_on_control_bytes_only() -> None:
    assert nondisk._text(b"\x11" * 4096) is None  # a fixed VHD full of 0x11: decodes as UTF-8, is not text
    assert nondisk._text(b"a" * 99 + b"\x11") is not None  # 1 % unprintable is still text
    assert nondisk._text(b"a" * 97 + b"\x11" * 3) is None


def _ascii_rule_by_characters(text: str, sample: bytes) -> bool:
    """The 98 % rule as the text sniff first wrote it, character by character."""
    if text.translate({ord(char): " " for char in "\n\r\t\f\v"}).isprintable():
        return True
    printable_bytes = bytes(range(0x20, 0x7F)) + b"\n\r\t\f\v"
    return len(text) - len(sample.translate(None, printable_bytes)) >= len(text) * 0.98


@settings(max_examples=600, deadline=None)
@given(
    body=st.binary(max_size=nondisk.TEXT_SAMPLE).map(lambda data: bytes(byte & 0x7F for byte in data)),
    printable=st.integers(0, nondisk.TEXT_SAMPLE),
    cut=st.integers(0, 3),
)
def test_the_ascii_rule_on_bytes_is_the_rule_on_characters(body: bytes, printable: int, cut: int) -> None:
    # Mostly printable samples, binary ones and those between; a text cut
    # short of its sample (a character cut at its end) too.
    sample = (b"a" * printable + body)[: nondisk.TEXT_SAMPLE]
    text = sample[: len(sample) - cut].decode("ascii")
    assert nondisk._mostly_printable_ascii(text, sample) == _ascii_rule_by_characters(text, sample)


def lz4_tool(data: bytes, *options: str) -> bytes:
    """`data` compressed by the lz4 command (Debian's lz4, a setup.sh package)."""
    return subprocess.run(["lz4", "-q", "-c", *options], input=data, capture_output=True, check=True).stdout


# Data that makes the encoder write long literal runs, long matches (lengths
# past 15 and 255) and matches that overlap what they copy (a short pattern
# repeated, offset smaller than length).
LZ4_PAYLOADS = st.lists(st.tuples(st.binary(min_size=1, max_size=12), st.integers(1, 700)), min_size=1, max_size=8).map(
    lambda pieces: b"".join(chunk * times for chunk, times in pieces)
)


@settings(max_examples=60, deadline=None)
@given(data=st.one_of(LZ4_PAYLOADS, st.binary(max_size=6000)), framing=st.sampled_from([("-l",), ("-9", "-BD")]))
def test_lz4_prefix_is_what_the_lz4_tool_packed(data: bytes, framing: tuple[str, ...]) -> None:
    # -l: the legacy framing kernels' initramfs use; -BD: a frame with linked blocks.
    assert ramdisk.decompressed_prefix(lz4_tool(data, *framing)) == ("lz4", data[: ramdisk.PREFIX])


def test_lz4_overlapping_match() -> None:
    # Literal "ab", then a match 2 back of 4 + 10 bytes: "ab" repeated.
    block = bytes([0x2A]) + b"ab" + bytes([2, 0])
    assert ramdisk._lz4_block(block, 100) == b"ab" * 8


@settings(max_examples=1500, deadline=None)
@given(block=st.lists(st.sampled_from([0x00, 0x01, 0x03, 0x11, 0x1F, 0xF0, 0xFF, 0x42, 0x10]), max_size=80).map(bytes))
def test_lz4_hostile_blocks_stay_within_the_limit(block: bytes) -> None:
    for limit in (1, 7, 64, 4096):
        try:
            out = ramdisk._lz4_block(block, limit)
        except (ValueError, IndexError):
            continue  # a bad offset, or a block cut short: "not decodable" to the sniff
        assert len(out) <= limit


@given(data=st.binary(max_size=64), start=st.integers(-2, 70))
def test_nonzero_from_is_any(data: bytes, start: int) -> None:
    assert nonzero_from(data, start) == any(data[max(0, start) :])


@given(
    slots=st.lists(st.booleans(), max_size=40),
    entry_size=st.sampled_from([1, 4, 32, 128]),
    extra=st.integers(0, 5),
    cut=st.integers(0, 8),
)
def test_entries_in_use_keeps_every_entry_that_holds_a_byte(
    slots: list[bool], entry_size: int, extra: int, cut: int
) -> None:
    table = b"".join((b"\x01" if used else b"\0") + bytes(entry_size - 1) for used in slots)
    data = b"head" + table
    count = len(slots) + extra  # a header may claim more entries than the data holds
    kept = entries_in_use(data, 4, entry_size, count)
    if 4 + count * entry_size > len(data):
        assert kept == count  # cut short: the parse must see the whole claim and report it
    else:
        assert all(not used for used in slots[kept:])
        assert kept == 0 or slots[kept - 1]
    assert entries_in_use(data[: len(data) - cut], 4, entry_size, 0) == 0


def eager_probe(data: bytes) -> list[str]:
    """Every container's own probe, none skipped."""
    buffer = data[:PROBE_SIZE].ljust(PROBE_SIZE, b"\0")
    return [container.name for container in registry.all_containers() if container.probe(buffer)]


# Starts of buffers each probe accepts (and near misses): the signatures,
# their versions and the text descriptor's forms.
PROBE_SEEDS = [
    b"QFI\xfb\0\0\0\x03", b"QFI\xfb\0\0\0\x02", b"QFI\xfb\0\0\0\x01", b"QFI\xfb\0\0\0\x00", b"QED\0",
    bytes(0x40) + b"\x7f\x10\xda\xbe", b"KDMV", b"COWD", b"version=1\n", b"# Disk\n  \nversion=2\r\n",
    b"#\nversion=3\n", b"vhdxfile", b"conectix", b"LUKS\xba\xbe\0\x01", b"LUKS\xba\xbe\0\x02",
    b"WithoutFreeSpace\x02\0\0\0", b"WithouFreSpacExt\x02\0\0\0",
    b"Bochs Virtual HD Image".ljust(32, b"\0") + b"Redolog".ljust(16, b"\0") + b"Growing".ljust(16, b"\0") + b"\0\0\x02\0",
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n",
]  # fmt: skip


@settings(max_examples=800, deadline=None)
@given(
    seed=st.sampled_from(PROBE_SEEDS),
    noise=st.binary(max_size=96),
    flips=st.lists(st.tuples(st.integers(0, 95), st.integers(0, 255)), max_size=3),
)
def test_signatures_never_hide_a_probe_match(seed: bytes, noise: bytes, flips: list[tuple[int, int]]) -> None:
    data = bytearray(seed + noise)
    for position, value in flips:
        if position < len(data):
            data[position] = value
    assert [container.name for container in registry.probe_containers(bytes(data))] == eager_probe(bytes(data))


def test_signatures_on_every_sample(samples_dir: Path, manifest: list[Any]) -> None:
    for entry in manifest:
        with (samples_dir / entry.file).open("rb") as image:
            head = image.read(PROBE_SIZE)
        assert [container.name for container in registry.probe_containers(head)] == eager_probe(head), entry.name


@given(data=st.binary(max_size=64), zeros=st.integers(0, 12000), lead=st.integers(0, 9000))
def test_used_length_is_rstrip(data: bytes, zeros: int, lead: int) -> None:
    padded = bytes(lead) + data + bytes(zeros)
    assert layout._used_length(padded) == len(padded.rstrip(b"\0"))


def eager_sniff(head: bytes) -> list[object]:
    """Every content sniffer on the head, none skipped."""
    return [content for sniff in registry.SNIFFERS if (content := sniff(head)) is not None]


def _placed(size: int, *pieces: tuple[int, bytes]) -> bytes:
    data = bytearray(size)
    for offset, piece in pieces:
        data[offset : offset + len(piece)] = piece
    return bytes(data)


_MBR_ENTRY = bytes([0x80, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little") + (4096).to_bytes(4, "little")
_X86_SETUP = (0x1F1, b"\x04"), (0x1FE, b"\x55\xaa"), (0x202, b"HdrS\x0f\x02"), (0x211, b"\x01")
# A head each content sniffer recognises, built from the structures it reads
# (not from the signature table under test).
CONTENT_SEEDS = [
    _placed(4096, (0, b"LUKS\xba\xbe\x00\x02")),
    _placed(40960, (32768, b"\x01CD001\x01"), (34816, b"\xffCD001\x01")),
    _placed(40960, (32768, b"\x00BEA01\x01"), (34816, b"\x00NSR02\x01"), (36864, b"\x00TEA01\x01")),
    _placed(40960, (32768, b"\x00BEA01\x01"), (34816, b"\x00NSR03\x01")),
    _placed(4096, *_X86_SETUP),
    _placed(4096, (0, b"MZ"), *_X86_SETUP),
    _placed(4096, (56, b"ARM\x64")),
    _placed(4096, (56, b"RSC\x05")),
    _placed(4096, (0x24, (0x016F2818).to_bytes(4, "little"))),
    _placed(4096, (0, b"\x7fELF\x02")),
    _placed(8192, (512, b"EFI PART\0\0\x01\0\x5c")),
    _placed(16384, (4096, b"EFI PART\0\0\x01\0\x5c")),
    _placed(4096, (446, _MBR_ENTRY), (510, b"\x55\xaa")),
    _placed(4096, (1080, b"\x53\xef")),
    _placed(4096, (0, b"XFSB\0\0\x10\0")),
    _placed(0x10100, (0x10040, b"_BHRfS_M")),
    _placed(4096, (0, b"hsqs")),
    _placed(4096, (512, b"LABELONE")),
    *(_placed(page, (page - 10, magic)) for page in (4096, 8192, 16384, 65536) for magic in (b"SWAPSPACE2", b"SWAP-SPACE")),
    _placed(4096, (3, b"NTFS    "), (510, b"\x55\xaa")),
    _placed(4096, (3, b"EXFAT   "), (510, b"\x55\xaa")),
    _placed(4096, (82, b"FAT32   "), (510, b"\x55\xaa")),
    _placed(4096, (54, b"FAT16   "), (510, b"\x55\xaa")),
    _placed(4096, (0, b"\xeb"), (0x10, b"\x02"), (0x15, b"\xf8"), (510, b"\x55\xaa")),
]  # fmt: skip


def test_every_content_seed_is_recognised_and_passes_the_signature_screen() -> None:
    for index, head in enumerate(CONTENT_SEEDS):
        assert eager_sniff(head), f"seed {index} is recognised by no sniffer"
        assert registry.may_hold_content(head), f"seed {index}: the screen would skip a sniffer that matches"


@settings(max_examples=1500, deadline=None)
@given(
    seed=st.sampled_from(CONTENT_SEEDS),
    cut=st.integers(0, 0x10100),
    flips=st.lists(st.tuples(st.integers(0, 0x10100), st.integers(0, 255)), max_size=4),
    shift=st.integers(-2, 2),
)
def test_the_signature_screen_never_hides_a_content_match(
    seed: bytes, cut: int, flips: list[tuple[int, int]], shift: int
) -> None:
    """Mutated, shifted and cut heads: whatever the sniffers find, the
    screened detector finds too."""
    data = bytearray(seed[-shift:] + seed[:-shift] if shift else seed)
    for position, value in flips:
        if position < len(data):
            data[position] = value
    head = bytes(data[:cut])
    found = eager_sniff(head)
    if found:
        assert registry.may_hold_content(head)
    assert sniff_contents(head, True) == found


def test_the_signature_screen_on_every_sample(samples_dir: Path, manifest: list[Any]) -> None:
    for entry in manifest:
        with (samples_dir / entry.file).open("rb") as image:
            head = image.read(HEAD_RETAIN)
        assert sniff_contents(head, True) == eager_sniff(head), entry.name


def _qcow2_with(tmp_path: Path, pieces: list[tuple[int, bytes]]) -> Path:
    """A qcow2 image made by qemu-img, 64 KiB clusters, with `pieces` written
    over it (past its header: content signatures a container image may hold)."""
    path = tmp_path / "image.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    data = bytearray(path.read_bytes().ljust(HEAD_RETAIN + 4096, b"\0"))
    for offset, piece in pieces:
        data[offset : offset + len(piece)] = piece
    path.write_bytes(bytes(data))
    return path


def test_the_first_read_is_short_and_signatures_past_it_are_still_found(tmp_path: Path) -> None:
    """A container image is inspected from a first read shorter than the head:
    a content signature past it (ISO at 32 KiB, swap at 64 KiB, btrfs at
    0x10040) still has the sniffers look at the whole head, file and stream alike."""
    beyond = [
        seed
        for seed in CONTENT_SEEDS
        if registry.may_hold_content(seed) and not registry.may_hold_content(seed[:FIRST_READ])
    ]
    assert len(beyond) >= 4  # ISO, UDF, the 64 KiB swap pages, btrfs
    reads: list[tuple[int, int]] = []
    pread = os.pread

    def counted(fd: int, length: int, offset: int) -> bytes:
        reads.append((offset, length))
        return pread(fd, length, offset)

    plain = _qcow2_with(tmp_path, [])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "pread", counted)
        assert inspect(plain).contents == ()
    # Nothing past the first read was copied for the plain image's head.
    assert (0, FIRST_READ) in reads and (0, HEAD_RETAIN) not in reads
    for seed in beyond:
        path = _qcow2_with(tmp_path, [(FIRST_READ, seed[FIRST_READ:])])
        data = path.read_bytes()
        expected = eager_sniff(data[:HEAD_RETAIN])
        assert expected, "the seed no longer holds what a sniffer recognises"
        info = inspect(path)
        assert info.format == "qcow2"
        assert list(info.contents) == expected
        stream = StreamInspector()
        stream.feed(data)
        assert stream.finish().contents == info.contents


def test_signature_windows_cover_every_signature_past_the_first_read() -> None:
    windows = registry.signatures_beyond(FIRST_READ)
    covered = {
        (start + relative_start, start + relative_end, signatures)
        for start, length, entries in windows
        for relative_start, relative_end, signatures in entries
        if relative_end <= length
    }
    assert covered == {entry for entry in registry.CONTENT_SIGNATURES if entry[1] > FIRST_READ}
    assert all(length <= 512 for _, length, _ in windows)  # small reads, not the head again


VMDK_LINE_PIECES = st.sampled_from(
    [
        b"=",
        b'"',
        b" ",
        b"\t",
        b"\r",
        b"\x0b",
        b"#",
        b"RW",
        b"RDONLY",
        b"5",
        b"-7",
        b"+1",
        b"FLAT",
        b"ddb.a",
        b"a",
        b"CID",
        b"x" * 11,
    ]
)


@settings(max_examples=3000, deadline=None)
@given(pieces=st.lists(VMDK_LINE_PIECES, max_size=12))
def test_a_key_value_line_is_no_extent_comment_or_strict_extent(pieces: list[bytes]) -> None:
    """The VMDK descriptor parser tries `key = value` first and then skips the
    other readings of the line: sound only while no line matches both."""
    line = b"".join(pieces)
    extent_line, strict_extent, key_value, _ = vmdk_descriptor._patterns()
    if key_value.match(line):
        assert not extent_line.match(line)
        assert not strict_extent.match(line)
        assert line.strip() and not line.strip().startswith(b"#")


def _sniffed_as_before(path: Path) -> tuple[object, ...]:
    """What the sniffers find in the whole head when no container claims it."""
    with path.open("rb") as image:
        return tuple(sniff_contents(image.read(HEAD_RETAIN), False))


def test_raw_data_reads_the_whole_head_only_when_a_sniffer_may_need_it(tmp_path: Path) -> None:
    """Raw data without a content signature or a compression magic is decided
    from the first read (the text, tar and archive sniffers look at its first
    4 KiB); content past the first read and compressed data still get the
    whole head, from a file and from a stream alike."""
    import gzip
    import random

    assert nondisk.TEXT_SAMPLE <= FIRST_READ
    noise = random.Random(7).randbytes(HEAD_RETAIN + 4096)
    cases = {
        "text": (b"plain text line\n" * 20000, False),
        "random": (noise, False),
        "iso past the first read": (_placed(HEAD_RETAIN, (32768, b"\x01CD001\x01"), (34816, b"\xffCD001\x01")), True),
        "btrfs past the first read": (_placed(HEAD_RETAIN, (0x10040, b"_BHRfS_M")), True),
        "gzip": (gzip.compress(noise, compresslevel=1), True),
    }
    pread = os.pread
    for name, (data, whole_head) in cases.items():
        path = tmp_path / "data"
        path.write_bytes(data)
        reads: list[tuple[int, int]] = []

        def counted(fd: int, length: int, offset: int, reads: list[tuple[int, int]] = reads) -> bytes:
            reads.append((offset, length))
            return pread(fd, length, offset)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os, "pread", counted)
            info = inspect(path)
        assert ((0, HEAD_RETAIN) in reads) == whole_head, name
        assert info.contents == _sniffed_as_before(path), name
        stream = StreamInspector()
        stream.feed(data)
        assert stream.finish().contents == info.contents, name
    assert inspect(tmp_path / "data").contents[0].name == "gzip"


def _reads_of(path: Path) -> tuple[object, list[tuple[int, int]]]:
    """The inspection of `path` behind a reader that records every call."""
    calls: list[tuple[int, int]] = []

    def read_at(offset: int, length: int) -> bytes:
        calls.append((offset, length))
        with path.open("rb") as image:
            image.seek(offset)
            return image.read(length)

    return inspect_reader(read_at, path.stat().st_size, filename=str(path)), calls


def test_vhdx_metadata_items_come_in_one_read(samples_dir: Path, manifest: list[Any]) -> None:
    vhdx_samples = [entry for entry in manifest if entry.format == "vhdx" and entry.group == "honest"]
    assert vhdx_samples
    for entry in vhdx_samples:
        path = samples_dir / entry.file
        info, calls = _reads_of(path)
        assert info == inspect(path)._replace(actual_size=None), entry.name
        # The metadata table is the one 64 KiB read past the region table; the
        # five mandatory items lie after it, and one read serves them all.
        table_offset = next(offset for offset, length in calls if length == 64 * 1024 and offset > 192 * 1024)
        item_reads = [(offset, length) for offset, length in calls if table_offset < offset < path.stat().st_size - 512]
        assert len(item_reads) == 1, (entry.name, item_reads)


def test_vhdx_metadata_items_spread_apart_are_read_one_by_one() -> None:
    places = [(b"a" * 16, 1000, 8), (b"b" * 16, 1000 + vhdx.ITEMS_SPAN, 4)]
    reads = vhdx._read_items(places)
    assert next(reads) == Read(1000, 8)
    assert reads.send(b"12345678") == Read(1000 + vhdx.ITEMS_SPAN, 4)
    with pytest.raises(StopIteration) as done:
        reads.send(b"wxyz")
    assert done.value.value == [(b"a" * 16, 1000, b"12345678"), (b"b" * 16, 1000 + vhdx.ITEMS_SPAN, b"wxyz")]


def test_vhdx_metadata_items_cut_from_one_read_are_cut_short_at_the_end_of_data() -> None:
    places = [(b"a" * 16, 100, 8), (b"b" * 16, 108, 16), (b"c" * 16, 124, 4)]
    reads = vhdx._read_items(places)
    assert next(reads) == Read(100, 28)
    with pytest.raises(StopIteration) as done:
        reads.send(b"0123456789")  # the data ends 10 bytes in
    assert done.value.value == [(b"a" * 16, 100, b"01234567"), (b"b" * 16, 108, b"89"), (b"c" * 16, 124, b"")]


def test_qcow2_feature_names_are_fresh_per_image_and_their_table_bounded() -> None:
    table = b"".join(
        bytes([kind, bit]) + name.ljust(46, b"\0")
        for kind, bit, name in ((0, 0, b"dirty"), (1, 0, b"lazy"), (7, 3, b"x\0y"))
    )
    first = qcow2._feature_names(table)
    assert first == [
        {"type": "incompatible", "bit": 0, "name": "dirty"},
        {"type": "compatible", "bit": 0, "name": "lazy"},
        {"type": "7", "bit": 3, "name": "x"},
    ]
    first[0]["name"] = "changed by a caller"
    first.append({})
    assert qcow2._feature_names(table)[0]["name"] == "dirty"
    assert len(qcow2._feature_names(table)) == 3
    for count in range(3 * qcow2._FEATURE_TABLES_KEPT):
        qcow2._feature_names(table + bytes([0, count]) + bytes(46))
        assert len(qcow2._feature_tables) <= qcow2._FEATURE_TABLES_KEPT
