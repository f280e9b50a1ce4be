"""Hostile input, generated, on the import path: gzip, xz, bzip2 and zstd
data and OVAs wrapping real small images (made by qemu-img), mutated by bit
flips, overwrites, insertions and truncation, then unpacked or imported.

Whatever the mutant, unpacking only refuses (SourceRefused, FormatError) or
succeeds, within a wall-clock bound, with bounded memory, and leaves no
staged file behind; the embedded `diskpipe import` ends with a record
(active, or killed with a reason), exit 0 or 1, and no temporary file in
the store or the staging directory.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from diskpipe.formats import FormatError
from diskpipe.jobs import sources
from tests.adversarial import compressed, ovf_naming, tar_of
from tests.memprobe import peak_rss, reset_peak
from tests.test_fuzz import watchdog

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
UNPACK_SECONDS = 30  # a hang guard per example, not a speed test
IMPORT_SECONDS = 120
# Growth of this process's peak RSS while one mutant is unpacked. The
# images inside are 1 MiB: a mutant may not make the codecs or tarfile hold
# more than this, whatever its headers claim.
UNPACK_GROWTH = 64 * MiB
PROCESS_CAP = 256 * MiB
ALLOWED = (sources.SourceRefused, FormatError)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A raw, a qcow2 and a vmdk of 1 MiB with some data, made by qemu-img."""
    directory = tmp_path_factory.mktemp("inner")
    raw = directory / "disk.raw"
    pattern = b"".join(index.to_bytes(4, "little") * 16 for index in range(1024))
    raw.write_bytes(pattern.ljust(MiB, b"\0"))
    found = {"raw": raw.read_bytes()}
    for fmt, options in (("qcow2", []), ("vmdk", ["-o", "subformat=streamOptimized"])):
        target = directory / f"disk.{fmt}"
        subprocess.run(
            ["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, *options, str(raw), str(target)],
            check=True,
            capture_output=True,
        )
        found[fmt] = target.read_bytes()
    return found


def wrap(kind: str, name: str, data: bytes) -> bytes:
    if not kind.startswith("ova"):
        return compressed(kind, data)
    disk = f"disk.{name}"
    ova = tar_of([("appliance.ovf", ovf_naming(disk)), ("notes.txt", b"hello"), (disk, data)])
    return ova if kind == "ova" else gzip.compress(ova, mtime=0)


WRAPPERS = ("gzip", "xz", "bzip2", "zstd", "ova", "ova.gz")


class Seeds(list[tuple[str, bytes]]):
    """The containers; a short repr keeps hypothesis' failure reports readable."""

    def __repr__(self) -> str:
        return f"<{len(self)} containers: {', '.join(label for label, _ in self)}>"


class Mutant(bytes):
    label = ""

    def __repr__(self) -> str:
        return f"<mutant of {self.label}: {len(self)} bytes, starting {bytes(self[:32])!r}>"


@pytest.fixture(scope="module")
def containers(images: dict[str, bytes]) -> Seeds:
    return Seeds((f"{name}.{kind}", wrap(kind, name, data)) for name, data in images.items() for kind in WRAPPERS)


@st.composite
def mutated(draw: st.DrawFn, containers: Seeds) -> Mutant:
    label, seed = draw(st.sampled_from(containers))
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        # Container headers (and a tar's first member header) sit at the
        # start; compressed data and trailers anywhere: aim at both.
        limit = min(len(data), draw(st.sampled_from([64, 1024, len(data)])))
        if not limit:
            break
        position = draw(st.integers(0, limit - 1))
        kind = draw(st.sampled_from(["flip", "byte", "max", "insert", "delete"]))
        if kind == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            data[position] = draw(st.integers(0, 255))
        elif kind == "max":
            data[position : position + 4] = b"\xff\xff\xff\x7f"
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=64))
        else:
            del data[position : position + draw(st.integers(1, 512))]
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))) :]
    mutant = Mutant(data)
    mutant.label = label
    return mutant


# Per hypothesis example: a mutant drawn from the containers, and a fresh
# directory for it, removed after the example.
MutantExample = Callable[[st.DataObject], AbstractContextManager[tuple[Mutant, Path]]]


@pytest.fixture
def mutant_example(containers: Seeds, tmp_path_factory: pytest.TempPathFactory) -> MutantExample:
    """(The examples share one test call, and so its tmp_path: each needs
    a directory of its own.)"""

    @contextmanager
    def example(data: st.DataObject) -> Iterator[tuple[Mutant, Path]]:
        mutant = data.draw(mutated(containers))
        directory = tmp_path_factory.mktemp("example")
        try:
            yield mutant, directory
        finally:
            shutil.rmtree(directory)

    return example


@contextmanager
def growth_bounded(limit: int) -> Iterator[None]:
    """The peak RSS of this process may grow by at most `limit` inside."""
    reset_peak()
    start = peak_rss()
    yield
    grown = peak_rss() - start
    assert grown < limit, f"peak memory grew by {grown >> 20} MiB"


def unpack_checked(path: Path, staging: Path) -> None:
    config = sources.ImportConfig(allowed_dirs=(str(path.parent),), staging_dir=str(staging), max_decompressed=64 * MiB)
    staged = sources.open_local(str(path), config)
    try:
        with watchdog(UNPACK_SECONDS), growth_bounded(UNPACK_GROWTH):
            try:
                unpacked, _ = sources.unpack(staged, config, label="fuzz")
            except ALLOWED:
                return
        if unpacked is not staged:
            unpacked.close()
    finally:
        staged.close()
        left = os.listdir(staging) if staging.exists() else []
        assert left == [], f"staged files left behind: {left}"


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_containers_unpack_or_refuse_and_leave_nothing(
    mutant_example: MutantExample, data: st.DataObject
) -> None:
    with mutant_example(data) as (mutant, directory):
        path = directory / "upload"
        path.write_bytes(mutant)
        unpack_checked(path, directory / "staging")


def unpack_upload(tmp_path: Path, data: bytes, label: str) -> tuple[sources.Staged, sources.ImageInfo]:
    """Unpack `data` uploaded as tmp_path/upload, staging in tmp_path/staging;
    the result stays open for the caller to close."""
    path = tmp_path / "upload"
    path.write_bytes(data)
    config = sources.ImportConfig(allowed_dirs=(str(tmp_path),), staging_dir=str(tmp_path / "staging"))
    staged = sources.open_local(str(path), config)
    try:
        return sources.unpack(staged, config, label=label)
    finally:
        staged.close()


# Whether an OVA inside gzip is unpacked is a configured nesting cap: the
# ova.gz seeds are fuzzed, not required to unpack.
@pytest.mark.parametrize(
    "label", [f"{name}.{kind}" for name in ("raw", "qcow2", "vmdk") for kind in WRAPPERS if kind != "ova.gz"]
)
def test_every_unmutated_container_unpacks(label: str, containers: Seeds, tmp_path: Path) -> None:
    """The seeds themselves are sound: the fuzzing starts from real imports."""
    data = dict(containers)[label]
    unpacked, info = unpack_upload(tmp_path, data, "seed")
    unpacked.close()
    assert info.format == label.split(".", maxsplit=1)[0] and unpacked.unpacked
    assert os.listdir(tmp_path / "staging") == []


@pytest.mark.parametrize("kind", ["gzip", "xz", "bzip2", "zstd"])
def test_corrupt_compressed_data_is_refused(kind: str, images: dict[str, bytes], tmp_path: Path) -> None:
    """A codec's own error (zlib.error, LZMAError, ZstdError...) is a refusal
    of the upload, never an unexpected exception that strands the job."""
    with pytest.raises(sources.SourceRefused):
        unpack_upload(tmp_path, corrupted(kind, images["qcow2"]), "corrupt")
    assert os.listdir(tmp_path / "staging") == []


def test_a_broken_inner_layer_leaves_no_staged_file(images: dict[str, bytes], tmp_path: Path) -> None:
    """Sound gzip around a broken OVA: the unpacked tar staged on the way is
    removed when the OVA is refused."""
    ova = bytearray(wrap("ova", "qcow2", images["qcow2"]))
    ova[len(ova) // 2 :] = bytes(len(ova) - len(ova) // 2)  # the disk member's data and the end are gone
    ova[0:512] = tar_of([("appliance.ovf", b"<Envelope>")])[:512]  # an OVF naming no disk
    with pytest.raises(sources.SourceRefused):
        unpack_upload(tmp_path, gzip.compress(bytes(ova), mtime=0), "layers")
    assert os.listdir(tmp_path / "staging") == []


# Runs the CLI in a process that then reports its own peak resident size
# (VmHWM): qemu-img, a child with limits of its own, is not counted.
PEAK_PROBE = """
import sys
from diskpipe.cli import main
try:
    code = main(sys.argv[2:])
finally:
    with open('/proc/self/status') as status:
        peak = next(line.split()[1] for line in status if line.startswith('VmHWM:'))
    with open(sys.argv[1], 'w') as out:
        out.write(peak)
sys.exit(code)
"""


def embedded_import(path: Path, home: Path, image_id: str) -> tuple[int, str, str, int]:
    """`diskpipe import` with no broker: (exit code, stdout, stderr, peak
    resident size of the diskpipe process itself, in bytes)."""
    env = dict(os.environ, XDG_DATA_HOME=str(home / "data"), DISKPIPE_IMPORT_STAGING_DIR=str(home / "staging"))
    for name in ("DISKPIPE_BROKER_URL", "DISKPIPE_CONFIG"):
        env.pop(name, None)
    peak_file = home / "peak"
    arguments = ["import", str(path), "--id", image_id, "--output=json", "--quiet"]
    with (home / "out").open("w+") as out, (home / "err").open("w+") as err:
        process = subprocess.Popen(
            [sys.executable, "-c", PEAK_PROBE, str(peak_file), *arguments],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=err,
        )
        try:
            process.wait(timeout=IMPORT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(f"diskpipe import still running after {IMPORT_SECONDS} s") from None
        out.seek(0)
        err.seek(0)
        if not peak_file.exists():
            raise AssertionError(f"the import process reported no peak: {err.read()}")
        return process.returncode, out.read(), err.read(), int(peak_file.read_text()) * 1024


def corrupted(kind: str, data: bytes) -> bytes:
    """Compressed `data` with 32 bytes in its middle overwritten."""
    packed = bytearray(wrap(kind, "qcow2", data))
    middle = len(packed) // 2
    packed[middle : middle + 16] = bytes(16)
    packed[middle + 16 : middle + 32] = b"\xff" * 16
    return bytes(packed)


@pytest.mark.parametrize("kind", ["gzip", "xz", "zstd"])
def test_a_corrupt_upload_is_a_refused_record_not_a_setup_error(
    kind: str, images: dict[str, bytes], tmp_path: Path
) -> None:
    """Exit 1 and a killed record that says why; not exit 2 (setup) with the
    record left `saving` for ever."""
    upload = tmp_path / f"disk.qcow2.{kind}"
    upload.write_bytes(corrupted(kind, images["qcow2"]))
    code, stdout, stderr, _ = embedded_import(upload, tmp_path, "corrupt")
    assert code == 1, (code, stderr)
    record = json.loads(stdout)
    assert record["status"] == "killed" and record["outcome"] == "refused", record


# Each example runs the CLI and qemu-img (seconds): few examples, no shrinking.
@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)
@given(data=st.data())
def test_mutated_containers_through_the_embedded_import(mutant_example: MutantExample, data: st.DataObject) -> None:
    with mutant_example(data) as (mutant, home):
        upload = home / f"upload.{mutant.label}"
        upload.write_bytes(mutant)
        code, stdout, stderr, peak = embedded_import(upload, home, "fuzzed")
        assert "Traceback" not in stderr, stderr
        assert code in (0, 1), (code, stderr)
        assert peak < PROCESS_CAP, f"diskpipe import peaked at {peak >> 20} MiB"
        record = json.loads(stdout)
        assert record["status"] in ("active", "killed"), record
        if record["status"] == "killed":
            assert record["outcome"] == "refused", record
        staging = home / "staging"
        assert not staging.exists() or os.listdir(staging) == []
        images = home / "data" / "diskpipe" / "images"  # made by the first store
        stored = sorted(os.listdir(images)) if images.exists() else []
        assert stored == (["fuzzed.raw"] if record["status"] == "active" else []), stored
