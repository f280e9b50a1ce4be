"""A stream inspection ends in `FormatError` or a verdict, never in another
exception, whatever the order of the structures in the file and however the
data is cut into chunks. An honest image whose tables come "backwards" for a
stream (a VHDX whose log lies after its metadata, which qemu opens) gets an
undecided verdict, and the check of the complete file then decides: it is
imported, from a local path and from a URL."""

from __future__ import annotations

import http.server
import itertools
import json
import os
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from diskpipe import validation
from diskpipe.converter.stores.file import FileStore
from diskpipe.formats import FormatError, ImageInfo, StreamInspector, inspect
from diskpipe.formats.base import InspectOptions
from diskpipe.formats.crc import crc32c
from diskpipe.formats.detect import inspection
from diskpipe.formats.errors import Unavailable
from diskpipe.formats.policy import Policy, check
from diskpipe.formats.reads import Read, ReadTail, run_on_reader
from diskpipe.jobs import sources
from diskpipe.jobs.pipeline import Environment, ImportJob, run_import
from diskpipe.jobs.records import SqliteRecords
from tests.conftest import ROOT

MiB = 1 << 20
HEADER_OFFSETS = (64 * 1024, 128 * 1024)
REGION_TABLES = (192 * 1024, 256 * 1024)
BAT_GUID = bytes.fromhex("6677c22d23f600429d64115e9bfd4a08")
METADATA_GUID = bytes.fromhex("06a27c8b90479a4bb8fe575f050f886e")
GROUPS = ("log", "bat", "metadata", "data")


def _with_crc(block: bytearray) -> bytearray:
    block[4:8] = bytes(4)
    struct.pack_into("<I", block, 4, crc32c(bytes(block)))
    return block


def relayout_vhdx(image: bytes, order: tuple[str, ...], *, log_guid: bytes | None = None) -> bytes:
    """The same VHDX (made by qemu-img, 1 MiB blocks) with its log, BAT,
    metadata region and data blocks moved to 1 MiB slots in `order`, every
    pointer and CRC rewritten: a valid image qemu opens. With `log_guid` the
    header names a log (so its region is read); the log holds no entry."""
    table = image[REGION_TABLES[0] : REGION_TABLES[0] + 64 * 1024]
    regions: dict[bytes, tuple[int, int]] = {}
    for index in range(struct.unpack_from("<I", table, 8)[0]):
        entry = 16 + 32 * index
        offset, length = struct.unpack_from("<QI", table, entry + 16)
        regions[table[entry : entry + 16]] = (offset, length)
    log_length = struct.unpack_from("<I", image, HEADER_OFFSETS[0] + 68)[0]
    bat_offset, bat_length = regions[BAT_GUID]
    bat = bytearray(image[bat_offset : bat_offset + bat_length])
    blocks = []  # (BAT entry index, block bytes)
    for index in range(bat_length // 8):
        entry = struct.unpack_from("<Q", bat, index * 8)[0]
        if entry & 7 in (6, 7):
            start = entry & 0xFFFFFFFFFFF00000
            blocks.append((index, image[start : start + MiB]))
    pieces = {
        # An empty log: qemu-img leaves stale entries of its own behind, which
        # diskpipe (unlike qemu, which compares their log GUID) counts as pending.
        "log": bytes(log_length),
        "metadata": image[regions[METADATA_GUID][0] : regions[METADATA_GUID][0] + regions[METADATA_GUID][1]],
    }
    out = bytearray(image[:MiB])
    where: dict[str, int] = {}
    for group in order:
        where[group] = len(out)
        if group == "data":
            for index, block in blocks:
                struct.pack_into("<Q", bat, index * 8, len(out) | (struct.unpack_from("<Q", bat, index * 8)[0] & 7))
                out += block.ljust(MiB, b"\0")
        elif group == "bat":
            out += bytes(bat_length)  # filled below, once the blocks have moved
        else:
            out += pieces[group]
    out[where["bat"] : where["bat"] + bat_length] = bat
    for header_offset in HEADER_OFFSETS:
        header = bytearray(out[header_offset : header_offset + 4096])
        if log_guid is not None:
            header[48:64] = log_guid
        struct.pack_into("<Q", header, 72, where["log"])
        out[header_offset : header_offset + 4096] = _with_crc(header)
    new_table = bytearray(table)
    for index in range(struct.unpack_from("<I", table, 8)[0]):
        entry = 16 + 32 * index
        group = "bat" if table[entry : entry + 16] == BAT_GUID else "metadata"
        struct.pack_into("<Q", new_table, entry + 16, where[group])
    _with_crc(new_table)
    for table_offset in REGION_TABLES:
        out[table_offset : table_offset + len(new_table)] = new_table
    return bytes(out)


@pytest.fixture(scope="module")
def vhdx_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """(guest data, a qemu-img VHDX of it with two data blocks)."""
    base = tmp_path_factory.mktemp("vhdx")
    guest = bytearray(8 * MiB)
    guest[:MiB] = os.urandom(MiB)
    guest[5 * MiB : 6 * MiB] = os.urandom(MiB)
    (base / "guest.raw").write_bytes(guest)
    options = "block_size=1M,subformat=dynamic"
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            "-o",
            options,
            str(base / "guest.raw"),
            str(base / "image.vhdx"),
        ],
        check=True,
    )
    return bytes(guest), (base / "image.vhdx").read_bytes()


def stream(data: bytes, chunks: list[int] | None = None, **options: Any) -> ImageInfo:
    """Feed `data` to a StreamInspector in chunks of the given sizes (cycled)."""
    inspector = StreamInspector(**options)
    sizes = itertools.cycle(chunks or [65536])
    view = memoryview(data)
    position = 0
    while position < len(data):
        size = next(sizes)
        inspector.feed(view[position : position + size])
        position += size
    return inspector.finish()


def qemu_opens(path: Path) -> dict[str, Any]:
    result = subprocess.run(
        ["qemu-img", "info", "--output=json", "-f", "vhdx", str(path)], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)  # type: ignore[no-any-return]


BACKWARDS = ("bat", "metadata", "data", "log")  # the log after the metadata


@pytest.fixture(scope="module")
def backwards(vhdx_source: tuple[bytes, bytes], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("backwards") / "backwards.vhdx"
    path.write_bytes(relayout_vhdx(vhdx_source[1], BACKWARDS, log_guid=uuid.uuid4().bytes))
    return path


def test_a_backwards_vhdx_is_honest_and_qemu_opens_it(backwards: Path, vhdx_source: tuple[bytes, bytes]) -> None:
    assert qemu_opens(backwards)["virtual-size"] == 8 * MiB
    converted = backwards.with_suffix(".raw")
    subprocess.run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(backwards), str(converted)], check=True)
    assert converted.read_bytes() == vhdx_source[0]
    info = inspect(backwards, allocation=True)
    assert (info.format, info.virtual_size, info.allocated_size) == ("vhdx", 8 * MiB, 2 * MiB)
    assert check(info, Policy()).safe


@pytest.mark.parametrize("chunk", [1 << 20, 65536, 4093, 300_000])
def test_the_stream_says_it_could_not_decide_a_backwards_vhdx(backwards: Path, chunk: int) -> None:
    info = stream(backwards.read_bytes(), [chunk], allocation=True)
    assert info.format == "vhdx" and info.undecided is not None
    assert "cannot follow" in info.undecided
    verdict = check(info, Policy())
    assert not verdict.safe and not verdict.decided and not verdict.issues
    assert verdict.notes[0].startswith("stream could not decide")
    assert verdict.to_json()["decided"] is False
    # The head still decides what it can: a claim that cannot fit is refused.
    refused = check(info, Policy(), claimed="qcow2")
    assert refused.decided and refused.checks == ["claimed_format"]


def test_a_chunk_that_holds_the_whole_backwards_vhdx_decides(backwards: Path) -> None:
    info = stream(backwards.read_bytes(), [16 << 20], allocation=True)
    assert (info.format, info.virtual_size, info.allocated_size) == ("vhdx", 8 * MiB, 2 * MiB)


def test_a_validating_reader_says_undecided_not_refused(backwards: Path) -> None:
    data = backwards.read_bytes()
    reader = validation.ValidatingReader(iter([data[i : i + 300_000] for i in range(0, len(data), 300_000)]))
    passed = bytearray()
    with pytest.raises(validation.UnsafeImage) as raised:
        for chunk in reader:
            passed += chunk
    assert bytes(passed) == data  # every byte went through before the end said so
    # An UnsafeImage, so a caller that only knows that stays safe.
    assert isinstance(raised.value, validation.StreamUndecided)
    assert raised.value.verdict is not None and raised.value.verdict.decided is False
    assert "stream could not decide" in str(raised.value)


def run_diskpipe(*args: str, stdin: IO[bytes] | None = None, env: dict[str, str] | None = None) -> Any:
    """The `diskpipe` command line, run as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "diskpipe", *args],
        stdin=stdin,
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )


def test_validate_from_standard_input_says_undecided(backwards: Path) -> None:
    with backwards.open("rb") as stdin:
        result = run_diskpipe("validate", "--output=json", "-", stdin=stdin)
    assert result.returncode == 1, result.stderr
    verdict = json.loads(result.stdout)
    assert verdict["decided"] is False and verdict["issues"] == []
    assert "stream could not decide" in verdict["notes"][0]
    on_file = run_diskpipe("validate", str(backwards))
    assert on_file.returncode == 0


def test_the_embedded_import_of_a_backwards_vhdx_reaches_active(
    backwards: Path, vhdx_source: tuple[bytes, bytes], tmp_path: Path
) -> None:
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "data"))
    env.pop("DISKPIPE_BROKER_URL", None)
    env.pop("DISKPIPE_CONFIG", None)
    done = run_diskpipe("import", str(backwards), "--id", "backwards-1", "--output=json", env=env)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["status"] == "active" and record["source_format"] == "vhdx"
    stored = tmp_path / "data" / "diskpipe" / "images" / "backwards-1.raw"
    assert stored.read_bytes() == vhdx_source[0]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def web(backwards: Path) -> Iterator[str]:
    handler = lambda *args: _Quiet(*args, directory=str(backwards.parent))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_url_import_of_a_backwards_vhdx_is_decided_by_the_staged_file(
    web: str, backwards: Path, vhdx_source: tuple[bytes, bytes], tmp_path: Path
) -> None:
    config = sources.ImportConfig(
        allowed_ports=(int(web.rsplit(":", 1)[1]),),
        allowed_networks=("127.0.0.1/32",),
        staging_dir=str(tmp_path / "staging"),
    )
    env = Environment(
        records=SqliteRecords(str(tmp_path / "records.sqlite")),
        store=FileStore(tmp_path / "store"),
        import_config=config,
    )
    record = run_import(ImportJob("backwards-url", f"{web}/{backwards.name}", claimed_format="vhdx"), env, "a1")
    assert record["status"] == "active", record.get("reason")
    assert any(note.startswith("stream could not decide") for note in record["notes"])
    assert (tmp_path / "store" / "backwards-url.raw").read_bytes() == vhdx_source[0]
    assert not list((tmp_path / "staging").iterdir())


@pytest.mark.parametrize("order", list(itertools.permutations(GROUPS)), ids="-".join)
def test_every_order_of_vhdx_structures_opens_in_qemu_and_streams_to_a_verdict(
    order: tuple[str, ...], vhdx_source: tuple[bytes, bytes], tmp_path: Path
) -> None:
    data = relayout_vhdx(vhdx_source[1], order, log_guid=uuid.uuid4().bytes)
    path = tmp_path / "image.vhdx"
    path.write_bytes(data)
    assert qemu_opens(path)["virtual-size"] == 8 * MiB
    from_file = inspect(path, allocation=True)
    streamed = stream(data, [100_000], allocation=True)
    if streamed.undecided is None:
        assert (streamed.format, streamed.virtual_size) == (from_file.format, from_file.virtual_size)
        assert check(streamed, Policy()).safe
    else:
        assert not check(streamed, Policy()).decided


# -- fuzzing: reordered and mutated structures, random chunk sizes ---------------

FUZZ_FORMATS = [
    ("qcow2", ["-o", "cluster_size=65536"]),
    ("qcow", []),
    ("vdi", []),
    ("vpc", []),
    ("vmdk", []),
    ("vmdk", ["-o", "subformat=streamOptimized"]),
    ("qed", []),
    ("parallels", []),
]


@pytest.fixture(scope="module")
def fuzz_seeds(vhdx_source: tuple[bytes, bytes], tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """Small whole images of every container qemu-img writes, with data."""
    base = tmp_path_factory.mktemp("seeds")
    guest = base / "guest.raw"
    guest.write_bytes(vhdx_source[0][: 3 * MiB])
    seeds = [vhdx_source[1]]
    for index, (fmt, options) in enumerate(FUZZ_FORMATS):
        out = base / f"seed{index}.{fmt}"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, *options, str(guest), str(out)], check=True)
        seeds.append(out.read_bytes())
    return seeds


@st.composite
def reordered_or_mutated(draw: st.DrawFn, seeds: list[bytes], vhdx: bytes) -> bytes:
    if draw(st.booleans()):
        order = draw(st.permutations(GROUPS))
        data = bytearray(relayout_vhdx(vhdx, tuple(order), log_guid=draw(st.sampled_from([None, bytes(range(16))]))))
    else:
        data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.sampled_from([0, 0, 1, 2, 4, 8]))):
        kind = draw(st.sampled_from(["u32", "u64", "max", "zero", "swap"]))
        # Pointers live in headers and tables: the first 4 KiB, the VHDX
        # header section and anywhere 512-aligned.
        area = draw(st.sampled_from([4096, MiB, len(data)]))
        position = min(draw(st.integers(0, max(0, min(area, len(data)) - 8))), len(data) - 8)
        if draw(st.booleans()):
            position -= position % 512
        if kind == "u32":
            data[position : position + 4] = struct.pack("<I", draw(st.integers(0, 2**32 - 1)))
        elif kind == "u64":
            data[position : position + 8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
        elif kind == "max":
            data[position : position + 8] = b"\xff" * 8
        elif kind == "zero":
            data[position : position + 8] = bytes(8)
        else:  # two 64 KiB blocks trade places: tables move behind or ahead
            blocks = len(data) // 65536
            if blocks >= 2:
                a, b = sorted(draw(st.lists(st.integers(0, blocks - 1), min_size=2, max_size=2, unique=True)))
                first, second = data[a * 65536 : (a + 1) * 65536], data[b * 65536 : (b + 1) * 65536]
                data[a * 65536 : (a + 1) * 65536], data[b * 65536 : (b + 1) * 65536] = second, first
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


def chunk_sizes() -> st.SearchStrategy[list[int]]:
    return st.lists(st.one_of(st.integers(1, 600), st.integers(4096, 3 * MiB)), min_size=1, max_size=6)


def stream_in(data: bytes, sizes: list[int]) -> ImageInfo:
    """The first chunks in the drawn sizes, the rest in the last size (at least
    64 KiB, so a fuzz case stays fast)."""
    inspector = StreamInspector(allocation=True)
    position = 0
    for size in sizes:
        inspector.feed(data[position : position + size])
        position += size
    rest = max(sizes[-1], 65536)
    while position < len(data):
        inspector.feed(data[position : position + rest])
        position += rest
    return inspector.finish()


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), sizes=chunk_sizes())
def test_reordered_and_mutated_streams_end_in_format_error_or_a_verdict(
    fuzz_seeds: list[bytes], vhdx_source: tuple[bytes, bytes], data: st.DataObject, sizes: list[int]
) -> None:
    image = data.draw(reordered_or_mutated(fuzz_seeds, vhdx_source[1]))
    try:
        streamed = stream_in(image, sizes)
    except FormatError as error:
        assert "inspection failed" not in str(error), "an inspector crashed on this data"
        streamed = None
    try:
        from_bytes: ImageInfo | None = run_on_reader(
            inspection(InspectOptions(allocation=True)),
            lambda offset, length: image[offset : offset + length],
            len(image),
        )
    except FormatError:
        from_bytes = None
    if streamed is None:
        event("stream: FormatError")
        assert from_bytes is None, "the stream refused what the file accepts"
        return
    verdict = check(streamed, Policy())
    if streamed.undecided is not None:
        event("stream: undecided")
        assert not verdict.decided and not verdict.safe
        return
    event("stream: decided")
    assert from_bytes is not None, "the stream decided what the file refuses"
    assert (streamed.format, streamed.virtual_size) == (from_bytes.format, from_bytes.virtual_size)


# -- inspector bugs: whatever goes wrong inside, only FormatError leaves ---------


def _raises(error: Exception) -> Any:
    def inspector(*_: Any) -> Any:
        yield Read(0, 512)
        raise error

    return inspector


def _yields(request: Any) -> Any:
    def inspector(*_: Any) -> Any:
        yield Read(0, 512)
        yield request

    return inspector


def _recurses(*_: Any) -> Any:
    def deeper(depth: int) -> int:
        return deeper(depth + 1)

    yield Read(0, 512)
    deeper(0)


def _behind_after_the_end(*_: Any) -> Any:
    yield ReadTail(512)  # waits for the end of the stream...
    yield Read(300_000, 512)  # ...then asks for bytes long passed
    return ImageInfo("raw", "raw", 0, 0)


def _swallows_unavailable(*_: Any) -> Any:
    yield Read(1_500_000, 16)
    try:
        yield Read(200_000, 16)
    except Unavailable:
        yield Read(200_000, 16)  # asks again: still passed
    return ImageInfo("raw", "raw", 0, 0)


BUGS = {
    "index-error": (_raises(IndexError("list index out of range")), "inspection failed"),
    "struct-error": (_raises(struct.error("unpack requires a buffer of 8 bytes")), "inspection failed"),
    "not-a-request": (_yields(None), "inspection failed"),
    "unbounded-read": (_yields(Read(0, 1 << 40)), "inspection failed"),
    "negative-read": (_yields(Read(-5, 10)), "inspection failed"),
    "recursion": (_recurses, "inspection failed"),
    "behind-after-the-end": (_behind_after_the_end, None),
    "asks-again-for-passed-bytes": (_swallows_unavailable, None),
}


@pytest.mark.parametrize("name", list(BUGS))
@pytest.mark.parametrize("chunk", [1000, 65536, 1 << 20])
def test_an_inspector_bug_ends_in_format_error_or_undecided(
    name: str, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diskpipe.formats import api

    broken, message = BUGS[name]
    monkeypatch.setattr(api, "inspection", broken)  # a bug cannot be caused for real
    data = bytes(range(256)) * 8192  # 2 MiB
    if message is None:
        info = stream(data, [chunk])
        assert info.undecided is not None and not check(info, Policy()).decided
    else:
        with pytest.raises(FormatError, match=message):
            stream(data, [chunk])
