"""The safety policy and the validation hook: every sample gets exactly the
verdict its manifest records; streams and files agree; the claimed-format
table; configuration; fail-closed checks; bounded memory on a huge stream."""

from __future__ import annotations

import gzip
import io
import os
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

import diskpipe
from diskpipe.formats import FormatError, StreamInspector, claim_prefix, inspect
from diskpipe.formats import policy as policy_module
from diskpipe.formats.policy import Policy, check, load_policy


def file_verdict(path: Path, claimed: str | None) -> tuple[str, list[str]]:
    try:
        verdict = diskpipe.validate(path, claimed=claimed, policy=Policy())
    except FormatError as error:
        return "malformed", [str(error)]
    return ("safe" if verdict.safe else "unsafe"), verdict.checks


def test_every_sample_gets_its_recorded_verdict(sample: Any, samples_dir: Path) -> None:
    assert file_verdict(samples_dir / sample.file, sample.claimed) == (sample.verdict, sorted(sample.checks))


def _stream_checks(path: Path, claimed: str | None, chunk: int) -> tuple[str, list[str]]:
    inspector = StreamInspector(allocation=True)
    with path.open("rb") as handle:
        while data := handle.read(chunk):
            inspector.feed(data)
    verdict = check(inspector.finish(), Policy(), claimed)
    return ("safe" if verdict.safe else "unsafe"), verdict.checks


def _reader_verdict(path: Path, claimed: str | None, chunk: int) -> str:
    with path.open("rb") as handle:
        reader = diskpipe.ValidatingReader(handle, claimed=claimed, policy=Policy(), chunk_size=chunk)
        passed = bytearray()
        try:
            for piece in reader:
                passed += piece[:16]  # the bytes pass through unchanged
        except diskpipe.UnsafeImage as unsafe:
            assert unsafe.issues
            return "unsafe"
    assert reader.verdict is not None and reader.verdict.safe
    return "safe"


@pytest.mark.parametrize("chunk", [1, 4096, 1 << 20, 16 << 20])
def test_stream_and_file_verdicts_agree(sample: Any, samples_dir: Path, chunk: int) -> None:
    path = samples_dir / sample.file
    size = path.stat().st_size
    limit = {1: 256 << 10}.get(chunk, 2 << 30)
    if size >= limit:
        pytest.skip(f"{chunk}-byte chunks only for samples under {limit} bytes")
    expected = (sample.verdict, sorted(sample.checks))
    if sample.verdict == "malformed":
        with pytest.raises(FormatError):
            _stream_checks(path, sample.claimed, chunk)
        return
    assert _stream_checks(path, sample.claimed, chunk) == expected
    assert _reader_verdict(path, sample.claimed, chunk) == sample.verdict


def test_the_reader_passes_every_byte_through_unchanged(samples_dir: Path, manifest: list[Any]) -> None:
    entry = next(entry for entry in manifest if entry.name == "qcow2-data-offsets")
    data = (samples_dir / entry.file).read_bytes()
    chunks = [data[start : start + 1000] for start in range(0, len(data), 1000)]
    reader = diskpipe.ValidatingReader(iter(chunks))
    assert b"".join(reader) == data
    reader = diskpipe.ValidatingReader(io.BytesIO(data))
    out = bytearray()
    while piece := reader.read(12345):
        out += piece
    assert bytes(out) == data and reader.verdict is not None and reader.verdict.safe


def test_the_reader_refuses_early_when_the_claim_cannot_match(samples_dir: Path, manifest: list[Any]) -> None:
    entry = next(entry for entry in manifest if entry.name == "qcow2-1t-c64k")
    seen = 0

    def upload() -> Any:
        nonlocal seen
        with (samples_dir / entry.file).open("rb") as handle:
            while data := handle.read(4096):
                seen += len(data)
                yield data
        # An endless tail: the verdict must come before it is needed.
        while True:
            seen += 4096
            yield bytes(4096)

    with pytest.raises(diskpipe.UnsafeImage) as refusal:
        for _ in diskpipe.ValidatingReader(upload(), claimed="raw"):
            pass
    assert [issue.check for issue in refusal.value.issues] == ["claimed_format"]
    assert seen <= 256 * 1024  # decided on the head, not the whole stream


def _bytes_passed_before_refusal(data: bytes, claimed: str) -> int:
    """Feed `data` one byte at a time, then zeros forever; count the bytes the
    reader took before it refused the claim."""
    seen = 0

    def upload() -> Any:
        nonlocal seen
        for index in range(len(data)):
            seen += 1
            yield data[index : index + 1]
        while True:
            seen += 1
            yield b"\0"

    with pytest.raises(diskpipe.UnsafeImage) as refusal:
        for _ in diskpipe.ValidatingReader(upload(), claimed=claimed, policy=Policy()):
            pass
    assert [issue.check for issue in refusal.value.issues] == ["claimed_format"]
    return seen


@pytest.mark.parametrize(
    ("claimed", "name", "decided_at"),
    [
        ("qcow2", "raw-1m-random", 1),
        ("qcow2", "qed-default", 2),  # "QED" and "QFI" share the Q
        ("QCOW2", "hostile-qcow-v1", 8),  # same magic, version 1: the version decides
        ("qcow", "qcow2-v3-c64k", 8),
        ("vmdk", "qcow2-v3-c64k", 1),
        ("vmdk", "vhdx-dynamic", 2),  # "v" may start a descriptor's "version=" line
        ("vhdx", "vdi-dynamic", 1),
        ("vdi", "qcow2-v3-c64k", 0x44),  # the VDI signature lies at 0x40
        ("qed", "qcow2-v3-c64k", 2),
        ("luks", "raw-1m-random", 1),
        ("ploop", "qcow2-v3-c64k", 1),
    ],
)
def test_a_header_claim_is_refused_at_the_first_byte_that_refutes_it(
    claimed: str, name: str, decided_at: int, samples_dir: Path, manifest: list[Any]
) -> None:
    entry = next(entry for entry in manifest if entry.name == name)
    data = (samples_dir / entry.file).read_bytes()[:4096]
    assert _bytes_passed_before_refusal(data, claimed) == decided_at


def test_a_vmdk_text_descriptor_claim_waits_for_qemus_probe_window() -> None:
    # Comment lines may come first; qemu's probe decides within 2048 bytes.
    data = b"# comment\n" * 300
    assert _bytes_passed_before_refusal(data, "vmdk") == claim_prefix.PREFIX_NEEDED


def test_no_first_bytes_refute_a_claim_that_fits(samples_dir: Path, manifest: list[Any]) -> None:
    """Every prefix of every sample of a header format leaves its own claim open."""
    checked = 0
    for entry in manifest:
        if not claim_prefix.needs_header(entry.format) or entry.verdict == "malformed":
            continue
        with (samples_dir / entry.file).open("rb") as handle:
            head = handle.read(claim_prefix.PREFIX_NEEDED)
        for length in range(1, len(head) + 1):
            assert claim_prefix.ruled_out(entry.format, head[:length]) is None, (entry.name, length)
        checked += 1
    assert checked >= 40


def test_empty_images_are_refused_unless_the_policy_allows_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    refused = diskpipe.validate(empty, policy=Policy())
    assert refused.checks == ["empty_image"] and "empty" in refused.issues[0].message
    assert diskpipe.validate(empty, policy=Policy(allow_empty_image=True)).safe
    with pytest.raises(diskpipe.UnsafeImage, match="empty_image"):
        for _ in diskpipe.ValidatingReader(iter([]), policy=Policy()):
            pass
    monkeypatch.setenv("DISKPIPE_POLICY_ALLOW_EMPTY_IMAGE", "true")
    assert load_policy().allow_empty_image
    assert diskpipe.validate(empty).safe


def test_streaming_memory_stays_bounded_on_a_4_gib_input(tmp_path: Path) -> None:
    path = tmp_path / "big.raw"
    with path.open("wb") as handle:
        handle.truncate(4 << 30)
        handle.seek((4 << 30) - 4096)
        handle.write(os.urandom(4096))
    tracemalloc.start()
    try:
        with path.open("rb") as handle:
            reader = diskpipe.ValidatingReader(handle, claimed="raw", policy=Policy(), chunk_size=16 << 20)
            total = 0
            for piece in reader:
                total += len(piece)
                del piece
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 4 << 30
    assert reader.verdict is not None and reader.verdict.safe
    # The bound: head 128 KiB + tail 4 KiB + one read of at most 1.06 MiB,
    # plus the chunk being passed through (16 MiB, the caller's) and bookkeeping.
    assert peak < (16 << 20) + (3 << 20)


CLAIMS = [
    ("raw", "raw-1m-random", True),
    ("raw", "vhd-fixed-1g", True),
    ("raw", "qcow2-v3-c64k", False),
    ("raw", "vmdk-monolithic-sparse", False),
    ("vhd", "vhd-dynamic", True),
    ("vpc", "vhd-fixed-1g", True),
    ("vhd", "raw-1m-random", False),
    ("ploop", "parallels-empty", True),
    ("parallels", "parallels-empty", True),
    ("iso", "iso-plain", True),
    ("iso", "iso-hybrid", True),
    ("iso", "raw-1m-random", False),
    ("ami", "ami-ext4", True),
    ("ami", "gpt-2part", True),
    ("ami", "iso-plain", False),
    ("aki", "aki-bzimage", True),
    ("aki", "aki-arm64-image-gz", True),
    ("aki", "aki-riscv-image", True),
    ("aki", "aki-riscv-image-zst", True),
    ("aki", "ami-ext4", False),
    ("aki", "hostile-gzip-qcow2", False),
    ("ami", "aki-arm64-image-gz", False),
    ("ari", "aki-riscv-image-zst", False),
    ("ari", "ari-cpio-gzip", True),
    ("ari", "ari-cpio", True),
    ("ari", "aki-bzimage", False),
    ("qcow2", "qcow2-v3-c64k", True),
    ("QCOW2", "qcow2-v3-c64k", True),
    ("qcow2", "qed-default", False),
    ("vmdk", "vmdk-stream-data", True),
    ("vdi", "vdi-dynamic", True),
    ("vhdx", "vhdx-dynamic", True),
    ("qed", "qed-default", True),
    ("luks", "luks-qemu", True),
    ("floppy", "raw-1m-random", False),
]


@pytest.mark.parametrize(("claimed", "name", "fits"), CLAIMS)
def test_claimed_format_table(claimed: str, name: str, fits: bool, samples_dir: Path, manifest: list[Any]) -> None:
    entry = next(entry for entry in manifest if entry.name == name)
    verdict = check(inspect(samples_dir / entry.file, allocation=True), Policy(), claimed)
    assert ("claimed_format" not in verdict.checks) == fits, verdict.issues


def test_a_check_that_crashes_fails_closed(
    samples_dir: Path, manifest: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(info: Any, context: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(policy_module, "CHECKS", [("broken", False, broken)])
    entry = next(entry for entry in manifest if entry.name == "qcow2-v3-c64k")
    verdict = check(inspect(samples_dir / entry.file), Policy())
    assert not verdict.safe
    assert verdict.checks == ["internal"]
    assert "boom" in verdict.issues[0].message


def test_policy_from_file_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, samples_dir: Path, manifest: list[Any]
) -> None:
    config = tmp_path / "diskpipe.toml"
    config.write_text('[policy]\nallowed_formats = ["raw", "bochs"]\nmax_virtual_size = "1G"\n')
    loaded = load_policy(str(config))
    assert loaded.allowed_formats == frozenset({"raw", "bochs"})
    assert loaded.max_virtual_size == 1 << 30
    monkeypatch.setenv("DISKPIPE_CONFIG", str(config))
    monkeypatch.setenv("DISKPIPE_POLICY_MAX_VIRTUAL_SIZE", "2T")
    assert load_policy().max_virtual_size == 2 << 40
    bochs = next(entry for entry in manifest if entry.name == "bochs-growing")
    assert check(inspect(samples_dir / bochs.file), loaded).safe
    config.write_text("[policy]\nno_such_key = 1\n")
    with pytest.raises(ValueError, match="unknown key"):
        load_policy(str(config))


def test_luks1_is_safe_with_a_note(samples_dir: Path, manifest: list[Any]) -> None:
    entry = next(entry for entry in manifest if entry.name == "luks-qemu")
    verdict = diskpipe.validate(samples_dir / entry.file)
    assert verdict.safe
    assert any("cannot be inspected" in note for note in verdict.notes)


def test_refusal_messages_say_why(samples_dir: Path, manifest: list[Any]) -> None:
    for entry in manifest:
        if entry.verdict != "unsafe":
            continue
        verdict = diskpipe.validate(samples_dir / entry.file, claimed=entry.claimed)
        for issue in verdict.issues:
            assert len(issue.message) > 15, (entry.name, issue)
    bochs = next(entry for entry in manifest if entry.name == "bochs-growing")
    (issue,) = diskpipe.validate(samples_dir / bochs.file).issues
    assert "policy" in issue.message


def test_one_head_check_serves_the_reader_and_downloads() -> None:
    """HeadCheck refutes a claimed header from the first bytes; for a
    download (which unpacks compressed data and OVAs first) it waits until
    the bytes cannot be a packed head: 262 bytes, tar's magic included."""
    from diskpipe.validation import HeadCheck, UnsafeImage

    def refused_after(data: bytes, *, unpacked_later: bool) -> int | None:
        head = HeadCheck(StreamInspector(), "qcow2", Policy(), unpacked_later=unpacked_later)
        for count in range(1, len(data) + 1):
            try:
                head.feed(data[count - 1 : count])
            except UnsafeImage as refusal:
                assert [issue.check for issue in refusal.issues] == ["claimed_format"]
                return count
        return None

    zeros = bytes(4096)
    assert refused_after(zeros, unpacked_later=False) == 1
    assert refused_after(zeros, unpacked_later=True) == 262
    gzip_head = gzip.compress(bytes(1 << 16))
    assert refused_after(gzip_head, unpacked_later=False) == 1
    assert refused_after(gzip_head, unpacked_later=True) is None
    tar_head = bytearray(4096)
    tar_head[257:262] = b"ustar"
    assert refused_after(bytes(tar_head), unpacked_later=True) is None
