"""Bounded unpacking: compressed uploads and OVAs are unpacked under caps
that a few hundred bytes of hostile input cannot get around, every refusal
names its cap, and no staged file survives any way out.

Every case is built here: bombs of zeros and of repetitive non-zero data in
each format, nested compression, OVAs with thousands of members, XML bombs
in the OVF, a disk before its OVF, and real faults injected at each step."""

from __future__ import annotations

import io
import lzma
import os
import resource
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from diskpipe.converter.stores.file import FileStore
from diskpipe.formats.errors import FormatError
from diskpipe.formats.policy import Policy
from diskpipe.jobs import sources, unpacking
from diskpipe.jobs.pipeline import Environment, ImportJob, run_import
from diskpipe.jobs.records import SqliteRecords
from tests.adversarial import compressed
from tests.adversarial import tar_of as ova

MiB = 1 << 20
REPOSITORY = Path(__file__).resolve().parents[1]  # the child processes import this checkout's diskpipe
ALGORITHMS = ("gzip", "xz", "bzip2", "zstd")
OVF_NAMESPACES = b'xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"'


def packed(kind: str, data: bytes) -> bytes:
    return compressed(kind, data, xz_preset=1)  # xz's default preset is slow on the 64 MiB bombs


def import_config(tmp_path: Path, **changes: Any) -> sources.ImportConfig:
    values: dict[str, Any] = {"allowed_dirs": (str(tmp_path),), "staging_dir": str(tmp_path / "staging")}
    values.update(changes)
    return sources.ImportConfig(**values)


def staging(config: sources.ImportConfig) -> list[str]:
    """What is left in the staging directory."""
    return sorted(os.listdir(config.staging_dir)) if os.path.isdir(config.staging_dir) else []


def upload(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def unpack_path(path: str, config: sources.ImportConfig, **options: Any) -> tuple[sources.Staged, Any]:
    """Unpack a local upload; the result stays open for the caller to close."""
    staged = sources.open_local(path, config)
    try:
        return sources.unpack(staged, config, "job", **options)
    finally:
        staged.close()


def refused(path: str, config: sources.ImportConfig, **options: Any) -> sources.SourceRefused:
    with pytest.raises(sources.SourceRefused) as caught:
        result, _ = unpack_path(path, config, **options)
        result.close()
    return caught.value


def refused_import(tmp_path: Path, job: ImportJob, config: sources.ImportConfig, policy: Policy) -> dict[str, Any]:
    """Run the whole import job into a file store; its record must say the
    upload was refused (exit 1), not that the infrastructure failed."""
    env = Environment(
        records=SqliteRecords(str(tmp_path / "records.sqlite")),
        store=FileStore(tmp_path / "store"),
        policy=policy,
        import_config=config,
    )
    record = run_import(job, env, "a1")
    assert (
        record["status"] == "killed" and record["outcome"] == "refused" and record["reason"].startswith("refused: ")
    ), record
    return record


def ovf(href: str = "disk1.vmdk", prologue: bytes = b"") -> bytes:
    return (
        b'<?xml version="1.0"?>' + prologue + b"<Envelope " + OVF_NAMESPACES + b"><References>"
        b'<File ovf:id="file1" ovf:href="' + href.encode() + b'"/></References>'
        b'<DiskSection><Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="1"/></DiskSection></Envelope>'
    )


@pytest.fixture(scope="module")
def vmdk(samples_dir: Path, manifest: list[Any]) -> bytes:
    return (samples_dir / next(entry for entry in manifest if entry.name == "vmdk-stream-data").file).read_bytes()


@pytest.fixture(scope="module")
def repetitive_bombs() -> dict[str, bytes]:
    """32 MiB of one non-zero byte: 46 bytes of bzip2, 1 KiB of zstd, 5 KiB of xz, 32 KiB of gzip."""
    data = b"A" * (32 * MiB)
    return {kind: packed(kind, data) for kind in ALGORITHMS}


@pytest.fixture(scope="module")
def zero_bombs() -> dict[str, bytes]:
    data = bytes(64 * MiB)
    return {kind: packed(kind, data) for kind in ALGORITHMS}


# -- caps -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALGORITHMS)
def test_a_repetitive_non_zero_bomb_is_refused_by_the_expansion_ratio(
    kind: str, tmp_path: Path, repetitive_bombs: dict[str, bytes]
) -> None:
    bomb = repetitive_bombs[kind]
    config = import_config(tmp_path)
    error = refused(upload(tmp_path, f"bomb.{kind}", bomb), config)
    assert "max_expansion_ratio = 200" in str(error), error
    assert getattr(error, "cap", None) == "max_expansion_ratio"
    assert staging(config) == []


@pytest.mark.parametrize("kind", ["xz", "bzip2", "zstd"])  # gzip cannot expand 3,200 times
def test_a_bomb_of_sparse_non_zero_bytes_is_refused_by_the_blocks_it_writes(kind: str, tmp_path: Path) -> None:
    # One non-zero byte per 4 KiB block: few non-zero bytes, every block written.
    bomb = packed(kind, (b"A" + bytes(4095)) * 16384)
    config = import_config(tmp_path)
    error = refused(upload(tmp_path, f"sparse-bomb.{kind}", bomb), config)
    assert "max_expansion_ratio = 200" in str(error) and "non-zero blocks" in str(error), error
    assert staging(config) == []


@pytest.mark.parametrize("kind", ALGORITHMS)
def test_zero_runs_become_holes_and_count_toward_the_size_cap_only(
    kind: str, tmp_path: Path, zero_bombs: dict[str, bytes]
) -> None:
    path = upload(tmp_path, f"zeros.{kind}", zero_bombs[kind])
    # 64 MiB of zeros from a few hundred bytes: no expansion ratio, just holes.
    config = import_config(tmp_path)
    result, _ = unpack_path(path, config)
    try:
        status = os.fstat(result.fd)
        assert status.st_size == 64 * MiB and status.st_blocks * 512 < MiB
        assert result.unpacked == [kind]
    finally:
        result.close()
    small = import_config(tmp_path, max_decompressed=16 * MiB)
    error = refused(path, small)
    assert "max_decompressed = 16777216" in str(error), error
    assert staging(small) == []


def test_the_policy_max_virtual_size_caps_unpacking_too(tmp_path: Path, zero_bombs: dict[str, bytes]) -> None:
    config = import_config(tmp_path)
    path = upload(tmp_path, "zeros.bz2", zero_bombs["bzip2"])
    error = refused(path, config, max_virtual_size=16 * MiB)
    assert "[policy] max_virtual_size = 16777216" in str(error), error
    record = refused_import(tmp_path, ImportJob("zero-bomb", path), config, Policy(max_virtual_size=16 * MiB))
    assert "max_virtual_size" in record["reason"]
    assert staging(config) == []


def test_unpacked_data_is_capped_by_the_staging_cap_as_it_is_written(tmp_path: Path) -> None:
    data = os.urandom(6 * MiB)  # incompressible: the ratio is about 1
    path = upload(tmp_path, "random.gz", packed("gzip", data))
    config = import_config(tmp_path, staging_cap=4 * MiB)
    error = refused(path, config)
    assert "staging_cap = 4194304" in str(error), error
    assert staging(config) == []


def upload_beside_other_jobs(tmp_path: Path) -> tuple[str, sources.ImportConfig]:
    """3 MiB of incompressible gzip under an 8 MiB staging cap, with the
    staging directory made for other jobs' files to be put in first."""
    path = upload(tmp_path, "random.gz", packed("gzip", os.urandom(3 * MiB)))
    config = import_config(tmp_path, staging_cap=8 * MiB)
    os.makedirs(config.staging_dir)
    return path, config


def test_a_staging_directory_full_of_other_jobs_is_not_the_uploads_fault(tmp_path: Path) -> None:
    path, config = upload_beside_other_jobs(tmp_path)
    other = Path(config.staging_dir) / "other-job.0.staged"
    other.write_bytes(os.urandom(6 * MiB))
    with pytest.raises(sources.SourceUnavailable, match="staging_cap"):
        unpack_path(path, config)
    assert staging(config) == [other.name]


def test_unpacking_is_time_limited_by_wall_clock_and_cpu(tmp_path: Path, zero_bombs: dict[str, bytes]) -> None:
    path = upload(tmp_path, "zeros.gz", zero_bombs["gzip"])
    wall = import_config(tmp_path, unpack_timeout=0.0)
    assert "unpack_timeout = 0 s" in str(refused(path, wall))
    cpu = import_config(tmp_path, unpack_cpu_time=0.001)
    assert "unpack_cpu_time = 0.001 s" in str(refused(path, cpu))
    assert staging(wall) == []


def test_compression_inside_compression_is_one_layer_too_many_by_default(tmp_path: Path) -> None:
    inner = packed("gzip", bytes(64 * MiB))  # 64 KiB
    path = upload(tmp_path, "nested.gz.xz", packed("xz", inner))
    config = import_config(tmp_path)
    error = refused(path, config)
    assert "gzip inside xz exceeds the cap max_unpack_layers = 1" in str(error), error
    assert staging(config) == []
    # Configured for two layers, the same upload is unpacked.
    two = import_config(tmp_path, max_unpack_layers=2)
    result, _ = unpack_path(path, two)
    try:
        assert result.unpacked == ["xz", "gzip"] and os.fstat(result.fd).st_size == 64 * MiB
    finally:
        result.close()
    assert staging(two) == []


def test_an_xz_stream_asking_for_a_huge_dictionary_is_refused(tmp_path: Path) -> None:
    filters = [{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 30}]
    path = upload(tmp_path, "big-dictionary.xz", lzma.compress(b"x" * 1000, filters=filters))
    config = import_config(tmp_path)
    assert "decoder memory" in str(refused(path, config))
    assert staging(config) == []


def test_a_refusal_by_a_cap_kills_the_record_as_refused(tmp_path: Path, repetitive_bombs: dict[str, bytes]) -> None:
    config = import_config(tmp_path)
    path = upload(tmp_path, "bomb.bz2", repetitive_bombs["bzip2"])
    record = refused_import(tmp_path, ImportJob("ratio-bomb", path), config, Policy())
    assert "max_expansion_ratio" in record["reason"]
    assert staging(config) == []


# -- OVA --------------------------------------------------------------------


def test_an_ova_with_thousands_of_members_is_refused_by_the_member_cap(tmp_path: Path, vmdk: bytes) -> None:
    members = [("appliance.ovf", ovf())] + [(f"padding{index}.txt", b"") for index in range(5000)]
    path = upload(tmp_path, "many.ova", ova([*members, ("disk1.vmdk", vmdk)]))
    config = import_config(tmp_path)
    error = refused(path, config)
    assert "max_ova_members = 1000" in str(error), error
    assert staging(config) == []


def test_the_ova_walk_stops_at_the_disk_its_ovf_names(tmp_path: Path, vmdk: bytes) -> None:
    # Whatever follows the disk is never read: here a pax header followed by
    # a broken header, which a full walk of the tar (getmembers) refuses.
    members = b""
    for name, data in (("a.ovf", ovf()), ("disk1.vmdk", vmdk)):
        header = tarfile.TarInfo(name)
        header.size = len(data)
        members += header.tobuf(tarfile.USTAR_FORMAT) + data + bytes(-len(data) % tarfile.BLOCKSIZE)
    extended = tarfile.TarInfo("d\u00e9j\u00e0-vu.txt").tobuf(tarfile.PAX_FORMAT)  # pax header, then the member's
    broken = extended[: -tarfile.BLOCKSIZE] + b"\xff" * tarfile.BLOCKSIZE
    path = upload(tmp_path, "ok.ova", members + broken + bytes(2 * tarfile.BLOCKSIZE))
    config = import_config(tmp_path)
    result, info = unpack_path(path, config)
    try:
        assert result.unpacked == ["ova"] and info.format == "vmdk"
    finally:
        result.close()
    assert staging(config) == []


@pytest.mark.parametrize(
    "prologue",
    [
        pytest.param(
            b'<!DOCTYPE Envelope [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
            b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">]>',
            id="billion-laughs",
        ),
        pytest.param(b'<!DOCTYPE Envelope [<!ENTITY disk SYSTEM "file:///etc/passwd">]>', id="external-entity"),
    ],
)
def test_an_ovf_with_a_dtd_or_entities_is_refused(prologue: bytes, tmp_path: Path, vmdk: bytes) -> None:
    reference = "&d;" if b"ENTITY d" in prologue else "&disk;"
    descriptor = ovf(reference, prologue)
    path = upload(tmp_path, "bomb.ova", ova([("a.ovf", descriptor), ("disk1.vmdk", vmdk)]))
    config = import_config(tmp_path)
    error = refused(path, config)
    assert "DTD" in str(error) and "root:" not in str(error), error
    assert staging(config) == []


def test_an_ova_whose_disk_comes_before_its_ovf_is_refused(tmp_path: Path, vmdk: bytes) -> None:
    path = upload(tmp_path, "backwards.ova", ova([("disk1.vmdk", vmdk), ("a.ovf", ovf())]))
    config = import_config(tmp_path)
    error = refused(path, config)
    assert "first member must be its OVF descriptor" in str(error) and "disk1.vmdk" in str(error), error
    assert staging(config) == []


@pytest.mark.parametrize(
    ("href", "links", "message"),
    [
        ("http://169.254.169.254/disk.vmdk", (), "not a plain member name"),
        ("../../etc/passwd", (), "not a plain member name"),
        ("/etc/passwd", (), "not a plain member name"),
        ("disk1.vmdk", ("disk1.vmdk",), "not a regular file"),
    ],
)
def test_the_disk_an_ovf_names_must_be_a_regular_member(
    href: str, links: tuple[str, ...], message: str, tmp_path: Path
) -> None:
    path = upload(tmp_path, "odd.ova", ova([("a.ovf", ovf(href))], links=links))
    config = import_config(tmp_path)
    assert message in str(refused(path, config))
    assert staging(config) == []


def test_an_ova_inside_gzip_is_a_second_layer(tmp_path: Path, vmdk: bytes) -> None:
    path = upload(tmp_path, "appliance.ova.gz", packed("gzip", ova([("a.ovf", ovf()), ("disk1.vmdk", vmdk)])))
    config = import_config(tmp_path)
    assert "ova inside gzip exceeds the cap max_unpack_layers = 1" in str(refused(path, config))
    result, info = unpack_path(path, import_config(tmp_path, max_unpack_layers=2))
    try:
        assert result.unpacked == ["gzip", "ova"] and info.format == "vmdk"
    finally:
        result.close()
    assert staging(config) == []


def test_a_huge_tar_header_extension_is_refused_without_reading_it(tmp_path: Path, vmdk: bytes) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        descriptor = tarfile.TarInfo("a.ovf")
        descriptor.size = len(ovf())
        archive.addfile(descriptor, io.BytesIO(ovf()))
        long_name = tarfile.TarInfo("x" * (6 * MiB))
        archive.addfile(long_name, io.BytesIO(b""))
        disk = tarfile.TarInfo("disk1.vmdk")
        disk.size = len(vmdk)
        archive.addfile(disk, io.BytesIO(vmdk))
    config = import_config(tmp_path)
    assert "tar record" in str(refused(upload(tmp_path, "long.ova", out.getvalue()), config))
    assert staging(config) == []


# -- every staged file removed, whatever fails --------------------------------


@pytest.mark.parametrize("kind", ALGORITHMS)
def test_a_truncated_or_trailing_stream_is_refused_and_leaves_nothing_staged(kind: str, tmp_path: Path) -> None:
    # Big enough that the cut falls after some output was already staged.
    data = packed(kind, os.urandom(2 * MiB))
    config = import_config(tmp_path)
    assert f"truncated {kind}" in str(refused(upload(tmp_path, f"cut.{kind}", data[: len(data) * 3 // 4]), config))
    assert f"{kind} data" in str(refused(upload(tmp_path, f"junk.{kind}", data + b"trailing junk"), config))
    assert staging(config) == []


@pytest.mark.parametrize("kind", ALGORITHMS)
def test_concatenated_streams_are_unpacked_whole(kind: str, tmp_path: Path) -> None:
    """pigz, pbzip2, `xz -T` and `cat a.zst b.zst` write several streams."""
    first, second = os.urandom(MiB), b"\x01" * MiB + os.urandom(4096)
    path = upload(tmp_path, f"two.{kind}", packed(kind, first) + packed(kind, second))
    result, _ = unpack_path(path, import_config(tmp_path))
    try:
        assert os.pread(result.fd, 3 * MiB, 0) == first + second
    finally:
        result.close()


def test_a_layer_the_inspector_rejects_leaves_nothing_staged(tmp_path: Path) -> None:
    # The unpacked layer is a malformed VMDK: inspecting it raises, and the
    # layer must still be removed.
    path = upload(tmp_path, "malformed.vmdk.gz", packed("gzip", b"KDMV" + bytes(4096)))
    config = import_config(tmp_path)
    with pytest.raises(FormatError, match="vmdk"):
        unpack_path(path, config)
    assert staging(config) == []


def test_a_failing_second_layer_removes_the_first(tmp_path: Path) -> None:
    inner = packed("gzip", os.urandom(MiB))
    path = upload(tmp_path, "nested.gz.gz", packed("gzip", inner[:-100]))
    config = import_config(tmp_path, max_unpack_layers=2)
    assert "truncated gzip" in str(refused(path, config))
    assert staging(config) == []


def test_a_staging_directory_that_becomes_unwritable_between_layers_leaves_no_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = upload(tmp_path, "nested.gz.gz", packed("gzip", packed("gzip", os.urandom(MiB))))
    config = import_config(tmp_path, max_unpack_layers=2)
    real_inspect = unpacking.inspect
    calls: list[int] = []

    def inspect_then_lock_staging(handle: Any, **options: Any) -> Any:
        # The fault is real (an immutable directory: nothing can be created
        # or removed in it, even by root); the hook only times it between layers.
        calls.append(1)
        if len(calls) == 2:
            subprocess.run(["chattr", "+i", config.staging_dir], check=True)
        return real_inspect(handle, **options)

    os.makedirs(config.staging_dir)
    if subprocess.run(["chattr", "+i", config.staging_dir], check=False, capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    subprocess.run(["chattr", "-i", config.staging_dir], check=True)
    monkeypatch.setattr(unpacking, "inspect", inspect_then_lock_staging)
    try:
        with pytest.raises(sources.SourceUnavailable, match="cannot stage"):
            unpack_path(path, config)
    finally:
        subprocess.run(["chattr", "-i", config.staging_dir], check=True)
    # The first layer's data went with its descriptor; only its claim's name
    # could not be removed from the locked directory: empty, unlocked, void.
    leftovers = staging(config)
    assert all(name.endswith(".unpacking") for name in leftovers), leftovers
    assert all(os.path.getsize(os.path.join(config.staging_dir, name)) == 0 for name in leftovers)
    assert unpacking.staged_bytes(config.staging_dir) == 0
    assert staging(config) == []


def test_claims_count_toward_the_staging_cap_only_while_held(tmp_path: Path) -> None:
    import fcntl

    path, config = upload_beside_other_jobs(tmp_path)
    # Another worker's live layer of 6 MiB: a locked claim of that size.
    live = Path(config.staging_dir) / "other.0.unpacking"
    live.touch()
    holder = os.open(live, os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        os.ftruncate(holder, 6 * MiB)
        with pytest.raises(sources.SourceUnavailable, match="staging_cap"):
            unpack_path(path, config)
        assert staging(config) == [live.name]
    finally:
        os.close(holder)
    # Its worker died (the lock is gone): the claim is void, the space free.
    result, _ = unpack_path(path, config)
    result.close()
    assert staging(config) == []


def test_a_full_disk_while_writing_is_an_infrastructure_failure_and_leaves_nothing(tmp_path: Path) -> None:
    """A real write failure: the child's file size limit makes the staged
    file's writes fail with EFBIG after 1 MiB."""
    path = upload(tmp_path, "random.gz", packed("gzip", os.urandom(4 * MiB)))
    staging_dir = tmp_path / "staging"
    script = textwrap.dedent(
        f"""
        import resource, signal
        from diskpipe.jobs import sources
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        config = sources.ImportConfig(allowed_dirs=({str(tmp_path)!r},), staging_dir={str(staging_dir)!r})
        staged = sources.open_local({path!r}, config)
        try:
            sources.unpack(staged, config, "job")
        except sources.SourceUnavailable as error:
            print("unavailable:", error)
        except sources.SourceRefused as error:
            print("refused:", error)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False, cwd=REPOSITORY
    )
    assert done.stdout.startswith("unavailable:") and "File too large" in done.stdout, (done.stdout, done.stderr)
    assert os.listdir(staging_dir) == []


def test_an_interrupt_at_any_write_leaves_nothing_staged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = upload(tmp_path, "random.xz", packed("xz", os.urandom(3 * MiB)))
    config = import_config(tmp_path)
    real_write = unpacking.CappedSparseWriter.write

    for failing_call in (1, 2, 3):
        calls = [0]

        def write_until(writer: Any, chunk: bytes, failing: int = failing_call, count: list[int] = calls) -> None:
            # No real fault raises KeyboardInterrupt mid-write: this one is injected.
            count[0] += 1
            if count[0] == failing:
                raise KeyboardInterrupt
            real_write(writer, chunk)

        monkeypatch.setattr(unpacking.CappedSparseWriter, "write", write_until)
        with pytest.raises(KeyboardInterrupt):
            unpack_path(path, config)
        assert staging(config) == [], failing_call


@pytest.mark.slow
def test_a_killed_worker_leaves_no_data_behind(tmp_path: Path) -> None:
    """SIGKILL runs no cleanup: the layer's data goes with the process; its
    claim stays as an empty name that counts for nothing and is removed by
    the next look at the staging directory or by `cleanup_staging`."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = b"".join(compressor.compress(bytes(MiB)) for _ in range(1024)) + compressor.flush()
    path = upload(tmp_path, "zeros.gz", zeros)  # 1 GiB of zeros
    staging_dir = tmp_path / "staging"
    script = textwrap.dedent(
        f"""
        from diskpipe.jobs import sources
        config = sources.ImportConfig(allowed_dirs=({str(tmp_path)!r},), staging_dir={str(staging_dir)!r})
        sources.unpack(sources.open_local({path!r}, config), config, "job")
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPOSITORY)
    try:
        deadline = time.monotonic() + 120
        claimed = lambda: staging_dir.is_dir() and any(n.endswith(".unpacking") for n in os.listdir(staging_dir))  # noqa: E731
        while not claimed() and time.monotonic() < deadline:
            time.sleep(0.02)
            assert child.poll() is None, "the unpacking ended before it could be killed"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    leftovers = os.listdir(staging_dir)
    assert len(leftovers) == 1 and leftovers[0].endswith(".unpacking"), leftovers
    assert sources.cleanup_staging(import_config(tmp_path)) == leftovers
    assert os.listdir(staging_dir) == []


def test_a_chain_of_thousands_of_tar_extension_headers_is_refused(tmp_path: Path, vmdk: bytes) -> None:
    descriptor = tarfile.TarInfo("a.ovf")
    descriptor.size = len(ovf())
    head = descriptor.tobuf(tarfile.USTAR_FORMAT) + ovf() + bytes(-len(ovf()) % tarfile.BLOCKSIZE)
    extended = tarfile.TarInfo("d\u00e9j\u00e0-vu.txt").tobuf(tarfile.PAX_FORMAT)
    pax, member = extended[: -tarfile.BLOCKSIZE], extended[-tarfile.BLOCKSIZE :]
    path = upload(tmp_path, "chain.ova", head + pax * 5000 + member + bytes(2 * tarfile.BLOCKSIZE))
    config = import_config(tmp_path)
    assert "too many chained tar headers" in str(refused(path, config))
    assert staging(config) == []


_SPARSE_OVF = (
    b'<?xml version="1.0"?><Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"'
    b' xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"><References><File ovf:id="f" ovf:href="disk.vmdk"/>'
    b'</References><DiskSection><Disk ovf:diskId="d" ovf:fileRef="f" ovf:capacity="1"/></DiskSection></Envelope>'
)


def _tar_of(*members: tuple[str, bytes, dict[str, str] | None], global_pax: dict[str, str] | None = None) -> bytes:
    out = io.BytesIO()
    for index, (name, data, pax) in enumerate(members):
        if index == 1 and global_pax is not None:
            out.write(tarfile.TarInfo.create_pax_global_header(global_pax))
        info = tarfile.TarInfo(name)
        info.size = len(data)
        if pax:
            info.pax_headers = pax
        out.write(info.tobuf(format=tarfile.PAX_FORMAT if pax else tarfile.USTAR_FORMAT))
        out.write(data + bytes(-len(data) % 512))
    return out.getvalue()


@pytest.mark.parametrize("form", ["global-0.1-map", "1.0-map-in-data", "bad-number-map"])
def test_gnu_sparse_members_are_refused_before_their_maps_cost_memory(form: str, tmp_path: Path) -> None:
    """tarfile expands GNU sparse maps into Python objects, for every member
    a global header applies to: a 4 MB OVA cost 1.4 GiB. Sparse members are
    refused before their map is parsed; a map tarfile cannot read is a
    refusal, not an internal error."""
    ovf = ("vm.ovf", _SPARSE_OVF, None)
    if form == "global-0.1-map":
        junk = [(f"junk{index}", b"", {"comment": "x"}) for index in range(20)]
        data = _tar_of(ovf, *junk, global_pax={"GNU.sparse.map": ",".join(["0,1"] * 1_000_000)})
    elif form == "1.0-map-in-data":
        count = 1_000_000
        body = b"%d\n" % count + b"1000\n1000\n" * count
        data = _tar_of(ovf, ("junk", body, {"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}))
    else:
        data = _tar_of(ovf, ("junk", b"x\n", {"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}))
    path = upload(tmp_path, "sparse.ova", data)
    config = import_config(tmp_path)
    started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(sources.SourceRefused, match="OVA"):
        unpack_path(path, config)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - started < 64 * 1024  # KiB: no map expanded
    assert [entry.name for entry in (tmp_path / "staging").iterdir() if entry.stat().st_blocks] == []
