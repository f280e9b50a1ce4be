"""Unpacking compressed uploads (gzip, xz, bzip2, zstd) and OVAs under caps
that a few hundred bytes of hostile input cannot get around.

What is counted, and against what (every cap is an `[import]` key):
- every byte unpacked, zero runs included, against `max_decompressed`
  (never above the policy's `max_virtual_size`): zero runs become holes,
  so this is the only cap they count toward;
- non-zero bytes against `max_expansion_ratio` times the packed bytes read
  so far, and the bytes actually written (4 KiB blocks that are not all
  zero) against 16 times that ratio (one non-zero byte per block must not
  fill the disk), each with a small grace so a tiny valid file is not judged
  on its first block; the bytes written also against `staging_cap`. Measured:
  a freshly made, empty 2 GiB ext4 compressed with `bzip2 -9` unpacks 181
  written bytes per packed byte but 2 non-zero ones; bombs of repetitive
  data reach 6,000 to 700,000;
- the wall-clock time and this thread's CPU time spent unpacking, against
  `unpack_timeout` and `unpack_cpu_time`, checked at every bounded step;
- containers inside containers (gzip inside gzip, an OVA inside xz...)
  against `max_unpack_layers`;
- an OVA's members against `max_ova_members`.

Memory stays bounded: decoders get 64 KiB of input and give at most 1 MiB of
output per call, an OVA is walked member by member (never `getmembers()`),
and no single read of the tar is larger than 4 MiB.

A cap that an upload exceeds is a refusal of that upload (`CapExceeded`, a
`SourceRefused`: the record is killed with the cap in its reason, exit 1),
not an infrastructure failure. A staging directory filled by other jobs, or
a write to it that fails, is `SourceUnavailable` (retried, exit 2).

Unpacked layers are anonymous files (see "staging" below): closed on every
path out (refusal, error, KeyboardInterrupt), and gone with the process
even when it is killed outright.
"""

from __future__ import annotations

import bz2
import contextlib
import fcntl
import lzma
import os
import tarfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from diskpipe.converter.stores.localfiles import anonymous_file
from diskpipe.formats import ImageInfo, inspect
from diskpipe.jobs.sources import ImportConfig, SourceRefused, SourceUnavailable, Staged

INPUT_CHUNK = 64 * 1024  # packed bytes handed to a decoder at a time
OUTPUT_CHUNK = 1024 * 1024  # most a decoder may return from one call
FLUSH_CHUNK = 1024 * 1024  # unpacked data is written in aligned pieces of this size
HOLE_BLOCK = 4096  # zero detection granularity: a filesystem block
ZERO_BLOCK = bytes(HOLE_BLOCK)
ZERO_FLUSH = bytes(FLUSH_CHUNK)
# Non-zero bytes allowed beyond ratio x packed bytes: the first output block
# of a small valid file may come from a few hundred packed bytes.
RATIO_GRACE = 4 * 1024 * 1024
# Blocks written may expand this many times more than non-zero bytes: a
# real image's metadata blocks are mostly zeros (an empty ext4's bitmaps and
# descriptors), a bomb's are not.
WRITTEN_RATIO_FACTOR = 16
STAGING_RESCAN = 256 * 1024 * 1024  # look at the other jobs' staged files again after this much data
TAR_READ_LIMIT = 4 * 1024 * 1024  # a tar header extension (pax, GNU long name) larger than this is refused
MAX_OVF_BYTES = 1024 * 1024
# xz -9 (and -9e) needs 65 MiB to decode; 128 MiB leaves room for a larger
# dictionary while keeping the whole process under its 256 MiB bound
# (tests/test_memory.py: a 192 MiB dictionary peaked at 257 MiB with 256).
XZ_MEMORY_LIMIT = 128 * 1024 * 1024
ZSTD_MAX_WINDOW = 1 << 27  # zstd's default --long window; larger windows are refused
ALGORITHMS = ("gzip", "xz", "bzip2", "zstd")


class CapExceeded(SourceRefused):
    """An upload went beyond an unpacking cap; `cap` is the configuration key."""

    def __init__(self, cap: str, message: str) -> None:
        super().__init__(message)
        self.cap = cap


@dataclass(frozen=True, slots=True)
class Limits:
    """The caps of one unpacking: `[import]`'s, read by their own names, with
    the size cap lowered to the policy's max_virtual_size where that is less."""

    config: ImportConfig
    max_size: int  # bytes unpacked, zeros included
    max_size_key: str  # the setting max_size comes from, for the refusal

    @classmethod
    def of(cls, config: ImportConfig, max_virtual_size: int | None) -> Limits:
        if max_virtual_size is not None and max_virtual_size < config.max_decompressed:
            return cls(config, max_virtual_size, "[policy] max_virtual_size")
        return cls(config, config.max_decompressed, "max_decompressed")


class Clock:
    """Wall-clock and CPU time spent on one unpacking (all its layers)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.config.unpack_timeout
        # Decoding runs in this thread: its CPU time is what the upload costs.
        self.cpu_start = time.thread_time()

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise CapExceeded(
                "unpack_timeout", f"unpacking exceeds the cap unpack_timeout = {self.limits.config.unpack_timeout:g} s"
            )
        if time.thread_time() - self.cpu_start > self.limits.config.unpack_cpu_time:
            raise CapExceeded(
                "unpack_cpu_time",
                f"unpacking exceeds the cap unpack_cpu_time = {self.limits.config.unpack_cpu_time:g} s of CPU",
            )


class PackedSource:
    """The packed input, read from the start through a duplicate descriptor;
    counts what was read and checks the clock at every read."""

    def __init__(self, fd: int, clock: Clock, read_limit: int | None = None) -> None:
        self._file: BinaryIO = open(os.dup(fd), "rb", buffering=0)  # noqa: SIM115 - closed by close()
        self._file.seek(0)  # a dup shares the offset: start from the beginning
        self.clock = clock
        self.read_limit = read_limit
        self.consumed = 0

    def read(self, size: int = -1) -> bytes:
        self.clock.check()
        if self.read_limit is not None and (size < 0 or size > self.read_limit):
            raise SourceRefused(f"a tar record of {size} bytes is larger than the {self.read_limit} bytes allowed")
        data = self._file.read(size)
        self.consumed += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.clock.check()
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()


# -- staging ------------------------------------------------------------------
#
# An unpacked layer is an anonymous file in the staging directory (O_TMPFILE,
# or created and unlinked at once where the filesystem lacks it): its data
# goes with its last descriptor, whatever kills the job, and qemu-img reads
# it as /dev/fd/N. So that `staging_cap` still sees it, the layer keeps a
# "claim": an empty named file, flock()ed for the layer's life, whose size
# (a sparse length, no blocks) is the data the layer holds. A claim nobody
# holds belongs to a dead job and counts for nothing.

CLAIM_SUFFIX = ".unpacking"
PENDING_SUFFIX = ".new"
CLAIM_EVERY = 16 * 1024 * 1024  # a claim's size follows the data in steps of this much


@dataclass
class UnpackedLayer(Staged):
    """A staged layer that leaves nothing behind once closed (or killed)."""

    claim_fd: int = -1
    claim_path: str = ""
    held: int = 0  # the data bytes the claim announces

    def claim(self, data: int) -> None:
        os.ftruncate(self.claim_fd, data)
        self.held = data

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        if self.claim_fd >= 0:
            # Void the claim first: its name outlives us if the directory has
            # become unwritable, and an empty unlocked claim counts for nothing.
            with contextlib.suppress(OSError):
                os.ftruncate(self.claim_fd, 0)
            with contextlib.suppress(OSError):
                os.unlink(self.claim_path)
            with contextlib.suppress(OSError):
                os.close(self.claim_fd)  # releases the lock
        self.fd = self.claim_fd = -1
        self.held = 0


def staged_bytes(directory: str) -> int:
    """Bytes held in the staging directory: the blocks of named files (a
    download) and what the live claims of unpacked layers announce."""
    total = 0
    for entry in os.scandir(directory):
        if not entry.is_file(follow_symlinks=False):
            continue
        if entry.name.endswith(CLAIM_SUFFIX):
            total += _live_claim(entry.path)
        else:
            total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total


def remove_void_claims(directory: str) -> list[str]:
    """Remove the claims of dead jobs; the names removed."""
    removed: list[str] = []
    for entry in os.scandir(directory):
        if not entry.is_file(follow_symlinks=False):
            continue
        # A claim still being named (".<name>.new") is left for a minute:
        # its creator locks it a moment after creating it.
        pending = entry.name.endswith(PENDING_SUFFIX) and entry.stat().st_mtime < time.time() - 60
        void = (entry.name.endswith(CLAIM_SUFFIX) or pending) and _live_claim(entry.path, remove=False) < 0
        if void:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(entry.name)
    return removed


def _live_claim(path: str, *, remove: bool = True) -> int:
    """The size a live claim announces, 0 for a void one (removed), or -1
    for a void one when `remove` is False."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.fstat(fd).st_size  # its layer is alive
        if not remove:
            return -1
        with contextlib.suppress(OSError):
            os.unlink(path)
        return 0
    finally:
        os.close(fd)


def _new_claim(directory: str, label: str) -> tuple[int, str]:
    """A locked claim file, locked before it gets the name scanners look at."""
    safe_label = "".join(char for char in label if char.isalnum() or char in "-_")[:64] or "job"
    name = f"{safe_label}.{uuid.uuid4().hex[:12]}"
    pending = os.path.join(directory, f".{name}{PENDING_SUFFIX}")
    fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        final = os.path.join(directory, name + CLAIM_SUFFIX)
        os.rename(pending, final)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(pending)
        raise
    return fd, final


def open_layer(config: ImportConfig, label: str, description: str) -> UnpackedLayer:
    """A new, empty unpacked layer in the staging directory."""
    directory = config.staging_dir
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = anonymous_file(directory)
        try:
            claim_fd, claim_path = _new_claim(directory, label)
        except BaseException:
            os.close(fd)
            raise
    except OSError as error:
        raise SourceUnavailable(f"cannot stage in {directory}: {error}") from error
    return UnpackedLayer(
        fd=fd, path=claim_path, owned=False, description=description, claim_fd=claim_fd, claim_path=claim_path
    )


class CappedSparseWriter:
    """Writes unpacked data to a staged file: zero blocks become holes, and
    every cap is checked as the data arrives."""

    def __init__(
        self,
        staged: UnpackedLayer,
        limits: Limits,
        clock: Clock,
        packed: Callable[[], int],
        *,
        upload_size: int,
        own_staged: int,
        staging_dir: str,
    ) -> None:
        self.staged = staged
        self.limits = limits
        self.clock = clock
        self.packed = packed  # packed bytes read so far by this layer
        self.upload_size = upload_size  # the outermost upload: bounds nested layers together
        self.own_staged = own_staged  # this job's other staged files
        self.staging_dir = staging_dir
        self.size = 0  # bytes unpacked, zeros included
        self.data = 0  # bytes written (non-zero blocks)
        self.nonzero = 0  # non-zero bytes among them
        self._buffer = bytearray()
        self._buffer_offset = 0
        self._others = 0
        self._data_at_scan = 0
        self._scan_staging()

    def write(self, chunk: bytes) -> None:
        self.clock.check()
        self.size += len(chunk)
        if self.size > self.limits.max_size:
            raise CapExceeded(
                self.limits.max_size_key,
                f"unpacked data exceeds the cap {self.limits.max_size_key} = {self.limits.max_size} bytes",
            )
        self._buffer += chunk
        while len(self._buffer) >= FLUSH_CHUNK:
            self._flush(FLUSH_CHUNK)

    def finish(self) -> None:
        """Write what is left and give the file its full size (a trailing hole
        too). No fsync: the file is read back on this host and never kept."""
        if self._buffer:
            self._flush(len(self._buffer))
        self._io(os.ftruncate, self.staged.fd, self.size)
        self._io(self.staged.claim, self.data)

    def _flush(self, length: int) -> None:
        piece = bytes(self._buffer[:length])
        del self._buffer[:length]
        offset = self._buffer_offset
        self._buffer_offset += length
        if piece == ZERO_FLUSH[:length]:
            return
        run_start: int | None = None
        for start in range(0, length, HOLE_BLOCK):
            zero = piece[start : start + HOLE_BLOCK] == ZERO_BLOCK[: min(HOLE_BLOCK, length - start)]
            if not zero and run_start is None:
                run_start = start
            elif zero and run_start is not None:
                self._write_run(piece, offset, run_start, start)
                run_start = None
        if run_start is not None:
            self._write_run(piece, offset, run_start, length)

    def _write_run(self, piece: bytes, offset: int, start: int, end: int) -> None:
        self.data += end - start
        self.nonzero += end - start - piece.count(0, start, end)
        self._check_data()
        self._io(os.pwrite, self.staged.fd, memoryview(piece)[start:end], offset + start)
        if self.data - self.staged.held >= CLAIM_EVERY:
            self._io(self.staged.claim, self.data)

    def _check_data(self) -> None:
        ratio = self.limits.config.max_expansion_ratio
        for packed in (self.packed(), self.upload_size):
            if self.nonzero > ratio * packed + RATIO_GRACE:
                raise CapExceeded(
                    "max_expansion_ratio",
                    f"unpacked data exceeds the cap max_expansion_ratio = {ratio}"
                    f" ({self.nonzero} non-zero bytes from {packed} packed bytes)",
                )
            if self.data > WRITTEN_RATIO_FACTOR * ratio * packed + RATIO_GRACE:
                raise CapExceeded(
                    "max_expansion_ratio",
                    f"unpacked data exceeds the cap max_expansion_ratio = {ratio}"
                    f" ({self.data} bytes of non-zero blocks from {packed} packed bytes,"
                    f" above {WRITTEN_RATIO_FACTOR} times the ratio)",
                )
        if self.own_staged + self.data > self.limits.config.staging_cap:
            raise CapExceeded(
                "staging_cap",
                f"unpacked data exceeds the cap staging_cap = {self.limits.config.staging_cap} bytes on its own",
            )
        if self.data - self._data_at_scan >= STAGING_RESCAN:
            self._scan_staging()
        if self._others + self.own_staged + self.data > self.limits.config.staging_cap:
            self._scan_staging()
            if self._others + self.own_staged + self.data > self.limits.config.staging_cap:
                raise SourceUnavailable(
                    f"staging directory {self.staging_dir} is full (staging_cap = {self.limits.config.staging_cap} bytes)"
                )

    def _scan_staging(self) -> None:
        """What the other jobs have staged now (this job's own files excluded)."""
        total = self._io(staged_bytes, self.staging_dir)
        self._others = max(0, total - self.staged.held - self.own_staged)
        self._data_at_scan = self.data

    def _io(self, operation: Callable[..., Any], *args: Any) -> Any:
        try:
            return operation(*args)
        except OSError as error:
            raise SourceUnavailable(f"cannot write to the staging directory {self.staging_dir}: {error}") from error


# -- decoders ---------------------------------------------------------------


class _Decoder(Protocol):
    @property
    def eof(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...
    @property
    def needs_input(self) -> bool: ...
    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


class _GzipMember:
    """zlib's decoder with the `needs_input` interface of bz2's and lzma's."""

    def __init__(self) -> None:
        self._zlib = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip wrapper: CRC and length checked

    @property
    def eof(self) -> bool:
        return self._zlib.eof

    @property
    def unused_data(self) -> bytes:
        return self._zlib.unused_data

    @property
    def needs_input(self) -> bool:
        return not self._zlib.unconsumed_tail

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        return self._zlib.decompress(self._zlib.unconsumed_tail + data, max_length)


def _new_decoder(algorithm: str) -> _Decoder:
    if algorithm == "gzip":
        return _GzipMember()
    if algorithm == "xz":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=XZ_MEMORY_LIMIT)
    return bz2.BZ2Decompressor()


_DECODER_ERRORS = (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError)


def _stream_chunks(algorithm: str, source: PackedSource) -> Iterator[bytes]:
    """gzip, xz and bzip2: concatenated streams (pigz, pbzip2, xz -T) are
    unpacked one after the other; gzip and xz may be padded with zeros
    between and after streams; anything else after a stream is refused."""
    decoder = _new_decoder(algorithm)
    pending = b""
    while True:
        source.clock.check()
        if decoder.eof:
            rest = decoder.unused_data
            if algorithm in ("gzip", "xz"):
                rest = rest.lstrip(b"\0")
                while not rest and (more := source.read(INPUT_CHUNK)):
                    rest = more.lstrip(b"\0")
            elif not rest:
                rest = source.read(INPUT_CHUNK)
            if not rest:
                return
            decoder, pending = _new_decoder(algorithm), rest
        if decoder.needs_input and not pending:
            pending = source.read(INPUT_CHUNK)
            if not pending:
                out = _decode(algorithm, decoder, b"")
                if out:
                    yield out
                    continue
                if decoder.eof:
                    continue
                raise SourceRefused(f"truncated {algorithm} data: the stream ends before its end marker")
        out = _decode(algorithm, decoder, pending)
        pending = b""
        if out:
            yield out


def _decode(algorithm: str, decoder: _Decoder, data: bytes) -> bytes:
    try:
        return decoder.decompress(data, OUTPUT_CHUNK)
    except _DECODER_ERRORS as error:
        if "Memory usage limit" in str(error):
            raise SourceRefused(f"xz data needs more than {XZ_MEMORY_LIMIT} bytes of decoder memory") from error
        raise SourceRefused(f"corrupt {algorithm} data: {error}") from error


def _zstd_chunks(source: PackedSource) -> Iterator[bytes]:
    import zstandard

    decoder = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    reader = decoder.stream_reader(  # PackedSource has the read() it needs
        source,  # type: ignore[arg-type]
        read_size=INPUT_CHUNK,
        read_across_frames=True,
        closefd=False,
    )
    while True:
        try:
            out = reader.read(OUTPUT_CHUNK)
        except zstandard.ZstdError as error:
            raise SourceRefused(f"corrupt zstd data: {error}") from error
        if not out:
            return
        yield out


ZSTD_FRAME_MAGIC = 0xFD2FB528
ZSTD_SKIPPABLE_MAGIC = 0x184D2A50  # the low 4 bits are free
ZSTD_FCS_BYTES = (0, 2, 4, 8)
ZSTD_DICT_ID_BYTES = (0, 1, 2, 4)


def check_zstd_frames(fd: int, clock: Clock) -> None:
    """Walk the zstd frames' headers (RFC 8878, section 3.1) to the end of
    the file: the streaming decoder stops quietly at a cut-off frame, and a
    truncated upload must not pass for a shorter disk."""
    size = os.fstat(fd).st_size
    position = 0
    blocks = 0

    def read(length: int) -> bytes:
        data = os.pread(fd, length, position)
        if len(data) < length:
            raise SourceRefused(f"truncated zstd data: the file ends inside a frame (offset {position})")
        return data

    while position < size:
        clock.check()
        magic = int.from_bytes(read(4), "little")
        if magic & 0xFFFFFFF0 == ZSTD_SKIPPABLE_MAGIC:
            position += 8 + int.from_bytes(os.pread(fd, 4, position + 4).ljust(4, b"\0"), "little")
            if position > size:
                raise SourceRefused("truncated zstd data: the file ends inside a skippable frame")
            continue
        if magic != ZSTD_FRAME_MAGIC:
            raise SourceRefused(f"corrupt zstd data: no frame starts at offset {position}")
        position += 4
        descriptor = read(1)[0]
        single_segment = bool(descriptor & 0x20)
        fcs_bytes = ZSTD_FCS_BYTES[descriptor >> 6] or (1 if single_segment else 0)
        position += 1 + (0 if single_segment else 1) + ZSTD_DICT_ID_BYTES[descriptor & 3] + fcs_bytes
        while True:
            header = int.from_bytes(read(3), "little")
            block_type, block_size = (header >> 1) & 3, header >> 3
            position += 3 + (1 if block_type == 1 else block_size)
            blocks += 1
            if blocks % 4096 == 0:
                clock.check()
            if header & 1:  # the last block
                break
        position += 4 if descriptor & 0x04 else 0  # content checksum
        if position > size:
            raise SourceRefused("truncated zstd data: the file ends inside a frame")


def decoded_chunks(algorithm: str, source: PackedSource) -> Iterator[bytes]:
    if algorithm not in ALGORITHMS:
        raise SourceRefused(f"{algorithm} data is not unpacked (supported: {', '.join(ALGORITHMS)})")
    if algorithm == "zstd":
        return _zstd_chunks(source)
    return _stream_chunks(algorithm, source)


# -- one layer --------------------------------------------------------------


@dataclass
class _Job:
    """What every layer of one unpacking shares."""

    config: ImportConfig
    limits: Limits
    clock: Clock
    label: str
    upload_size: int
    own_staged: Callable[[], int]


def _unpack_layer(
    current: Staged, job: _Job, what: str, fill: Callable[[PackedSource, UnpackedLayer], None], **source_options: Any
) -> Staged:
    """A new staged layer that `fill` writes from the packed one; on any
    failure the new layer is closed (it has no name: nothing is left)."""
    source = PackedSource(current.fd, job.clock, **source_options)
    try:
        result = open_layer(job.config, job.label, f"{current.description} ({what})")
        try:
            fill(source, result)
        except BaseException:
            result.close()
            raise
    finally:
        source.close()
    return result


def decompress(current: Staged, algorithm: str, job: _Job) -> Staged:
    """Unpack a compressed layer into a new staged file."""
    if algorithm == "zstd":
        check_zstd_frames(current.fd, job.clock)

    def fill(source: PackedSource, result: UnpackedLayer) -> None:
        writer = _writer(result, job, lambda: source.consumed)
        for chunk in decoded_chunks(algorithm, source):
            writer.write(chunk)
        writer.finish()

    return _unpack_layer(current, job, algorithm, fill)


def extract_ova(current: Staged, job: _Job) -> Staged:
    """Copy the disk the OVF names out of an OVA, walking the tar member by
    member: the OVF must come first (DSP0243), the walk stops at the disk."""
    return _unpack_layer(
        current, job, "ova", lambda source, result: _copy_ova_disk(source, result, job), read_limit=TAR_READ_LIMIT
    )


class _SparseMember(Exception):
    """A tar member in a GNU sparse format: no OVA needs one."""


class _PlainTarInfo(tarfile.TarInfo):
    """Tar headers without GNU sparse maps. tarfile expands a sparse map
    (pax `GNU.sparse.*`, a map in the data area, type 'S') into Python
    objects in full, for every member a global header applies to: a 4 MB
    OVA could cost gigabytes. An OVA's disk is a plain file, so any sparse
    member is refused before its map is parsed."""

    def _proc_sparse(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo:
        raise _SparseMember("old GNU sparse member")

    def _proc_gnusparse_00(self, *args: Any) -> None:
        raise _SparseMember("GNU sparse 0.0 member")

    def _proc_gnusparse_01(self, *args: Any) -> None:
        raise _SparseMember("GNU sparse 0.1 member")

    def _proc_gnusparse_10(self, *args: Any) -> None:
        raise _SparseMember("GNU sparse 1.0 member")


def _copy_ova_disk(source: PackedSource, result: UnpackedLayer, job: _Job) -> None:
    try:
        with tarfile.open(fileobj=source, mode="r:", tarinfo=_PlainTarInfo) as tar:  # type: ignore[call-overload]
            member = _ova_disk_member(tar, job.limits)
            handle = tar.extractfile(member)
            if handle is None:
                raise SourceRefused(f"the OVA's disk {member.name!r} is not a regular file")
            writer = _writer(result, job, lambda: source.consumed)
            while chunk := handle.read(OUTPUT_CHUNK):
                writer.write(chunk)
            if writer.size != member.size:
                raise SourceRefused(f"the OVA ends inside its disk {member.name!r}")
            writer.finish()
    except tarfile.TarError as error:
        raise SourceRefused(f"not a readable OVA: {error}") from error
    except RecursionError as error:  # a chain of thousands of pax headers
        raise SourceRefused("not a readable OVA: too many chained tar headers") from error
    except _SparseMember as error:
        raise SourceRefused(f"not a usable OVA: {error} (an OVA holds plain files)") from error
    except (ValueError, EOFError, OverflowError) as error:  # numbers in headers tarfile cannot parse
        raise SourceRefused(f"not a readable OVA: {error}") from error


def _ova_disk_member(tar: tarfile.TarFile, limits: Limits) -> tarfile.TarInfo:
    first = tar.next()
    if first is None or not first.isfile() or not first.name.lower().endswith(".ovf"):
        name = "nothing" if first is None else repr(first.name)
        raise SourceRefused(f"an OVA's first member must be its OVF descriptor (DSP0243), not {name}")
    disk = ovf_disk_file(_read_ovf(tar, first))
    count = 1
    while (member := tar.next()) is not None:
        # tarfile keeps every member it has read; the walk needs none of them.
        tar.members.clear()  # type: ignore[attr-defined]
        count += 1
        if count > limits.config.max_ova_members:
            raise CapExceeded(
                "max_ova_members", f"the OVA exceeds the cap max_ova_members = {limits.config.max_ova_members}"
            )
        if member.name.removeprefix("./") == disk:
            if not member.isfile():
                raise SourceRefused(f"the OVA's disk {disk!r} is not a regular file (a link or special file)")
            if member.size > limits.max_size:
                raise CapExceeded(
                    limits.max_size_key,
                    f"the OVA's disk of {member.size} bytes exceeds the cap {limits.max_size_key} = {limits.max_size}",
                )
            return member
    raise SourceRefused(f"the OVA does not hold the disk {disk!r} its OVF names")


def _read_ovf(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    if member.size > MAX_OVF_BYTES:
        raise SourceRefused(f"OVF descriptor of {member.size} bytes is larger than {MAX_OVF_BYTES}")
    handle = tar.extractfile(member)
    if handle is None:
        raise SourceRefused("the OVF descriptor is not a regular file")
    return handle.read(MAX_OVF_BYTES)


def ovf_disk_file(descriptor: bytes) -> str:
    """The file name of the first disk an OVF descriptor lists. No DTD, no
    entities, no external references: an OVF needs none of them."""
    from xml.etree.ElementTree import ParseError

    import defusedxml
    from defusedxml.ElementTree import fromstring

    try:
        root = fromstring(descriptor, forbid_dtd=True)
    except defusedxml.DefusedXmlException as error:
        raise SourceRefused(f"the OVF descriptor uses a DTD or entities, which are refused: {error!r}") from error
    except ParseError as error:
        raise SourceRefused(f"the OVF descriptor is not valid XML: {error}") from error
    files: dict[str, str] = {}
    disks: list[str] = []
    for element in root.iter():
        tag = str(element.tag).rsplit("}", 1)[-1]
        attributes = {key.rsplit("}", 1)[-1]: value for key, value in element.attrib.items()}
        if tag == "File" and "id" in attributes and "href" in attributes:
            files[attributes["id"]] = attributes["href"]
        elif tag == "Disk" and "fileRef" in attributes:
            disks.append(attributes["fileRef"])
    reference = next((files[disk] for disk in disks if disk in files), None)
    if reference is None:
        raise SourceRefused("the OVF descriptor names no disk file")
    return _member_name(reference)


def _member_name(href: str) -> str:
    """An OVF href must name a member of the OVA itself: a relative path
    inside it, not a URL, an absolute path or a way out."""
    name = href.removeprefix("./")
    parts = name.split("/")
    if not name or ":" in parts[0] or name.startswith("/") or "\\" in name or ".." in parts or "" in parts:
        raise SourceRefused(f"the OVF's disk reference {href!r} is not a plain member name of the OVA")
    return name


def _writer(result: UnpackedLayer, job: _Job, packed: Callable[[], int]) -> CappedSparseWriter:
    return CappedSparseWriter(
        result,
        job.limits,
        job.clock,
        packed,
        upload_size=job.upload_size,
        own_staged=job.own_staged(),
        staging_dir=job.config.staging_dir,
    )


# -- all layers ---------------------------------------------------------------


def _packing(info: ImageInfo) -> str | None:
    """The container to unpack: a compression algorithm, "ova" or "tar"; None for
    a disk image (or anything else, which the policy judges)."""
    if info.format != "raw":
        return None
    for content in info.contents:
        if content.kind == "compressed":
            return str(content.name)
        if content.kind == "archive" and content.name in ("ova", "tar"):
            # A tar is only ever unpacked as an OVA: one whose OVF is not
            # its first member is refused as such, with that reason.
            return str(content.name)
    return None


def _held(staged: Staged) -> int:
    """Staging space a file of this job holds."""
    if isinstance(staged, UnpackedLayer):
        return staged.held
    return os.fstat(staged.fd).st_blocks * 512 if staged.owned else 0


def unpack(
    staged: Staged, config: ImportConfig, label: str, *, max_virtual_size: int | None = None
) -> tuple[Staged, ImageInfo]:
    """Inspect staged data; unpack compressed data and OVAs, up to
    `max_unpack_layers` one inside another. Returns the data to convert and
    its facts; intermediate layers are removed, also when this fails."""
    limits = Limits.of(config, max_virtual_size)
    layers: list[str] = []
    current = staged
    try:
        job = _Job(
            config=config,
            limits=limits,
            clock=Clock(limits),
            label=label,
            upload_size=os.fstat(staged.fd).st_size,
            own_staged=lambda: _held(staged) + (_held(current) if current is not staged else 0),
        )
        while True:
            with open(os.dup(current.fd), "rb") as handle:
                info = inspect(handle, allocation=True)
            packing = _packing(info)
            if packing is None:
                current.unpacked = layers
                return current, info
            if len(layers) >= limits.config.max_unpack_layers:
                inside = "".join(f" inside {layer}" for layer in reversed(layers))
                raise CapExceeded(
                    "max_unpack_layers",
                    f"{packing}{inside} exceeds the cap max_unpack_layers = {limits.config.max_unpack_layers}",
                )
            if packing in ("ova", "tar"):
                unpacked, packing = extract_ova(current, job), "ova"
            else:
                unpacked = decompress(current, packing, job)
            layers.append(packing)
            if current is not staged:
                current.close()
            current = unpacked
    except BaseException:
        if current is not staged:
            with contextlib.suppress(OSError):
                current.close()
        raise
