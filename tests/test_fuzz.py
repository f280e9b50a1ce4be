"""Hostile input, generated: random and mutated headers of every format only
ever raise the documented FormatError, read a bounded number of bytes, hold
bounded memory and never hang; mutated hostile images that the policy lets
through really are harmless to qemu-img."""

from __future__ import annotations

import json
import signal
import subprocess
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diskpipe.formats import FormatError
from diskpipe.formats.base import InspectOptions
from diskpipe.formats.detect import inspection
from diskpipe.formats.policy import Policy, check
from diskpipe.formats.reads import MAX_READ, GetSize, Read, ReadTail, StreamDriver
from tests import adversarial

SEED_BYTES = 256 * 1024  # mutants are made from each seed's first 256 KiB
WATCHDOG_SECONDS = 60  # a hang guard, not a speed test


class Hang(Exception):
    pass


@contextmanager
def watchdog(seconds: int = WATCHDOG_SECONDS) -> Iterator[None]:
    def fire(signum: int, frame: Any) -> None:
        raise Hang(f"inspection still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def inspect_counting(data: bytes) -> tuple[Any, int, int]:
    """Inspect bytes; return (info, bytes read, number of requests)."""
    generator = inspection(InspectOptions(allocation=True))
    size = len(data)
    read_bytes = 0
    requests = 0
    try:
        request = next(generator)
        while True:
            requests += 1
            if isinstance(request, Read):
                assert request.length <= MAX_READ
                answer: bytes | int = data[request.offset : request.offset + request.length]
                read_bytes += len(answer)  # type: ignore[arg-type]
            elif isinstance(request, ReadTail):
                answer = data[max(0, size - request.length) :]
            else:
                assert isinstance(request, GetSize)
                answer = size
            request = generator.send(answer)
    except StopIteration as stop:
        return stop.value, read_bytes, requests


@pytest.fixture(scope="module")
def seeds(samples_dir: Path, manifest: list[Any]) -> list[tuple[str, bytes]]:
    """Small heads of every container sample, honest and hostile."""
    found = []
    for entry in manifest:
        path = samples_dir / entry.file
        if path.stat().st_size == 0:
            continue
        with path.open("rb") as handle:
            found.append((entry.name, handle.read(SEED_BYTES)))
    return found


def judge(data: bytes) -> None:
    """Inspect and judge: only FormatError may escape; reading is bounded."""
    tracemalloc.start()
    try:
        with watchdog():
            try:
                info, read_bytes, requests = inspect_counting(data)
            except FormatError:
                return
            check(info, Policy())
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Every structure read lies in the data: duplicated or overlapping tables
    # are refused before they are re-read, so reads stay near the data size.
    assert read_bytes <= 16 * len(data) + 8 * MAX_READ
    assert requests <= 4 * len(data) // 512 + 10_000
    assert peak < 64 << 20


@st.composite
def mutants(draw: st.DrawFn, seeds: list[tuple[str, bytes]]) -> bytes:
    _, seed = draw(st.sampled_from(seeds))
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 12))):
        # Headers live in the first few KiB: mutate there most of the time.
        limit = min(len(data), draw(st.sampled_from([128, 1024, 4096, len(data)])))
        if not limit:
            break
        position = draw(st.integers(0, limit - 1))
        kind = draw(st.sampled_from(["byte", "word", "max", "zero"]))
        if kind == "byte":
            data[position] = draw(st.integers(0, 255))
        elif kind == "word":
            data[position : position + 4] = draw(st.binary(min_size=4, max_size=4))
        elif kind == "max":
            data[position : position + 8] = b"\xff" * 8
        else:
            data[position : position + 8] = bytes(8)
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    if cut is not None:
        del data[cut:]
    return bytes(data)


MAGICS = [b"QFI\xfb", b"QED\x00", b"KDMV", b"COWD", b"vhdxfile", b"conectix", b"LUKS\xba\xbe", b"WithouFreSpacExt",
          b"# Disk DescriptorFile\nversion=1\n", b"\x1f\x8b", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd", b"\x04\x22\x4d\x18"]  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_headers_only_raise_format_error(seeds: list[tuple[str, bytes]], data: st.DataObject) -> None:
    judge(data.draw(mutants(seeds)))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(magic=st.sampled_from(MAGICS), body=st.binary(min_size=0, max_size=8192), at=st.sampled_from([0, 0x40]))
def test_random_headers_only_raise_format_error(magic: bytes, body: bytes, at: int) -> None:
    data = bytearray(body.ljust(at + len(magic), b"\0"))
    data[at : at + len(magic)] = magic
    judge(bytes(data))


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), chunk=st.sampled_from([1, 7, 512, 4096, 65536]))
def test_mutants_stream_like_files(seeds: list[tuple[str, bytes]], data: st.DataObject, chunk: int) -> None:
    mutant = data.draw(mutants(seeds))
    try:
        from_bytes: Any = inspect_counting(mutant)[0]
    except FormatError as error:
        from_bytes = type(error)
    driver = StreamDriver(inspection(InspectOptions(allocation=True)))
    try:
        for start in range(0, len(mutant), chunk):
            driver.feed(mutant[start : start + chunk])
        streamed: Any = driver.finish()
    except FormatError as error:
        streamed = type(error)
    if isinstance(from_bytes, type) or isinstance(streamed, type):
        assert from_bytes == streamed
    else:
        assert streamed.format == from_bytes.format and streamed.virtual_size == from_bytes.virtual_size


@pytest.fixture(scope="module")
def hostile(samples_dir: Path, manifest: list[Any]) -> list[tuple[str, bytes, str]]:
    found = []
    for entry in manifest:
        if entry.group == "hostile" and entry.format in ("qcow2", "vmdk", "qed") and entry.qemu_oracle:
            data = (samples_dir / entry.file).read_bytes()
            if len(data) <= 1 << 20:
                found.append((entry.name, data, entry.format))
    return found


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_hostile_images_judged_safe_are_harmless_to_qemu(
    hostile: list[tuple[str, bytes, str]], data: st.DataObject, tmp_path_factory: pytest.TempPathFactory
) -> None:
    _, seed, fmt = data.draw(st.sampled_from(hostile))
    mutant = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 6))):
        position = data.draw(st.integers(0, min(len(mutant), 4096) - 1))
        mutant[position] = data.draw(st.integers(0, 255))
    try:
        info, _, _ = inspect_counting(bytes(mutant))
    except FormatError:
        return
    verdict = check(info, Policy())
    if not verdict.safe:
        return
    path = tmp_path_factory.mktemp("mutant") / f"mutant.{fmt}"
    path.write_bytes(bytes(mutant))
    result = subprocess.run(
        ["qemu-img", "info", "--output=json", "--force-share", "-f", info.format, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return  # qemu refuses it: harmless
    oracle = json.loads(result.stdout)
    assert "backing-filename" not in oracle, oracle
    specific = oracle.get("format-specific", {}).get("data", {})
    assert "data-file" not in specific, oracle
    for extent in specific.get("extents", []):
        assert extent["filename"] == str(path), oracle


TABLE_BOMBS = {
    "qcow2 L2 tables past the end": adversarial.qcow2_l2_past_end,
    "qcow L2 tables 8 bytes apart": adversarial.qcow1_overlapping_tables,
    "qed L2 tables past the end": adversarial.qed_l2_past_end,
    "vmdk grain tables past the end": lambda: adversarial.vmdk_sparse(128 * 1024, past_end=True),
}


@pytest.mark.parametrize("name", sorted(TABLE_BOMBS))
def test_tables_that_point_past_the_end_or_overlap_cost_little(name: str) -> None:
    """A few MB of table entries naming tables past the end of the data (or
    overlapping ones) must not make the inspector read, or scan zeros, once
    per entry: that would be minutes of CPU bought with one small upload."""
    judge(TABLE_BOMBS[name]())


def test_a_descriptor_of_many_extents_is_refused_before_it_costs_memory() -> None:
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="more than"):
            inspect_counting(adversarial.vmdk_text_descriptor())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak >> 20} MiB"
