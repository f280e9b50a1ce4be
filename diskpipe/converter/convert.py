"""Convert one image into a store: inspect -> validate -> cross-check (the
empty target created meanwhile) -> convert -> seal, with the re-inspection
and the checksums (one read of the stored data) beside it, or on RBD after
it, from the snapshot -> finalize.

Nothing reaches qemu-img before the policy accepts the image; qemu-img
always gets the format the inspector found; a failure at any step removes
the temporary image, so the store never holds a partial one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from diskpipe.converter import qemu_img
from diskpipe.converter.checksums import Checksums, hash_image
from diskpipe.converter.limits import convert_limits
from diskpipe.converter.qemu_img import CancelToken, ConvertOptions, ImageSpec, QemuImgError
from diskpipe.converter.stores.base import Location, Store, StoreError, StoreUnavailable, check_image_id
from diskpipe.formats import FormatError, ImageInfo
from diskpipe.formats.api import inspect_fd, inspect_reader
from diskpipe.formats.policy import Policy, Verdict, check
from diskpipe.refusal import refuse, require_safe

Progress = Callable[[str, float], None]  # (stage, percent of that stage)
TARGET_FORMATS = ("raw", "qcow2")
# Ceph/librados failures seen in qemu-img's stderr: infrastructure, not the image.
_INFRASTRUCTURE_ERRORS = (
    "No space left",
    "error connecting",
    "Connection timed out",
    "timed out",
    "rados",
    "Disk quota",
)


class ConversionFailed(RuntimeError):
    """qemu-img (or the store) failed on an image the policy accepted."""


@dataclass(frozen=True, slots=True)
class ConvertRequest:
    source: str  # a path, opened once; with source_fd only a name for messages
    image_id: str
    to_format: str = "raw"
    claimed: str | None = None
    policy: Policy = field(default_factory=Policy)
    full_hashes: bool = True  # Glance's md5 and sha512
    # diskpipe's sparse digest (reads the allocated data once, beside the
    # full hashes when those are asked too). With neither, nothing is read
    # back but the re-inspection's few blocks.
    sparse_hash: bool = False
    key_file: str | None = None  # LUKS passphrase file
    options: ConvertOptions = field(default_factory=ConvertOptions)
    timeout: float | None = None
    source_fd: int | None = None  # an already open source; the caller closes it

    def __post_init__(self) -> None:
        check_image_id(self.image_id)


@dataclass(frozen=True, slots=True)
class ConvertResult:
    image_id: str
    location: Location
    source: ImageInfo
    stored_format: str
    virtual_size: int
    checksums: Checksums
    verdict: Verdict
    qemu_virtual_size: int  # what qemu's default reading gives (differs for CHS-sized VHDs)
    publish_sparse: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Glance's field names for the stored image."""
        out: dict[str, Any] = {
            "id": self.image_id,
            "status": "active",
            "disk_format": self.stored_format,
            "container_format": "bare",
            "virtual_size": self.virtual_size,
            "locations": [{"url": self.location.url, "metadata": self.location.metadata}],
            "source_format": self.source.format,
            "source_disk_format": self.source.disk_format,
            "source_virtual_size": self.qemu_virtual_size,
        }
        out.update(self.checksums.glance_properties(include_sparse=self.publish_sparse))
        if self.verdict.notes:
            out["notes"] = list(self.verdict.notes)
        out["timings"] = {key: round(value, 3) for key, value in self.timings.items()}
        return out


def open_source(path: str) -> int:
    """Open the source once: inspection, qemu-img's cross-check and the
    conversion all read through this descriptor, so renaming another file
    over `path` in between changes nothing, and qemu-img never sees `path`."""
    # Non-blocking so a FIFO cannot hang the open; it is refused just below.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise OSError(errno.EINVAL, "not a regular file or block device", path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_key_file(path: str) -> int:
    """The passphrase file, opened here and handed to qemu-img as a descriptor."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    os.set_blocking(fd, True)
    return fd


def source_spec(info: ImageInfo, fd: int, key_fd: int | None) -> tuple[ImageSpec, int]:
    """How qemu-img must open the source, and the virtual size it will see.

    A VHD that qemu 7.2 sizes by CHS geometry although its footer states a
    larger current_size (VirtualBox, Azure, Virtual PC creators) is opened
    with force_size_calc=current_size, so the tail (often a backup GPT) is
    kept.
    """
    options: list[tuple[str, str]] = []
    virtual_size = info.virtual_size
    if info.format == "vpc" and info.details.get("size-source") == "chs":
        current = info.details["footer-current-size"] // 512 * 512
        if current > info.virtual_size:
            options.append(("force_size_calc", "current_size"))
            virtual_size = current
    if info.encrypted and key_fd is not None:
        # LUKS takes the key as `key-secret`, qcow2's built-in LUKS as `encrypt.key-secret`.
        options.append(("key-secret" if info.format == "luks" else "encrypt.key-secret", "sec0"))
        return ImageSpec(fd, info.format, tuple(options), secret_fd=key_fd), virtual_size
    return ImageSpec(fd, info.format, tuple(options)), virtual_size


def cross_check(
    info: ImageInfo, spec: ImageSpec, expected_size: int, cancel: CancelToken | None = None
) -> dict[str, Any]:
    """qemu-img info (with the format given) must agree with the inspector."""
    try:
        report = qemu_img.info(spec, cancel=cancel)
    except QemuImgError as error:
        raise refuse(
            "cross_check", f"qemu-img cannot open the image as {info.format}: {error.stderr.strip()}"
        ) from error
    problems = []
    if report.get("format") != info.format:
        problems.append(f"format {report.get('format')!r} vs {info.format!r}")
    if report.get("virtual-size") != expected_size:
        problems.append(f"virtual size {report.get('virtual-size')} vs {expected_size}")
    if report.get("backing-filename") != info.backing_file:
        problems.append(f"backing file {report.get('backing-filename')!r} vs {info.backing_file!r}")
    data_file = report.get("format-specific", {}).get("data", {}).get("data-file")
    if data_file != (info.data_file or None):
        problems.append(f"data file {data_file!r} vs {info.data_file!r}")
    if problems:
        raise refuse("cross_check", f"qemu-img reads the image differently: {'; '.join(problems)}")
    return report


def _failed(error: QemuImgError, store: Store) -> Exception:
    if any(marker in error.stderr for marker in _INFRASTRUCTURE_ERRORS):
        # The store's trouble (full, unreachable), not the image's: say so first.
        return StoreUnavailable(f"writing into the {store.name} store failed: {error}")
    return ConversionFailed(str(error))


def _reinspect(target: Any, stored_format: str, virtual_size: int) -> ImageInfo:
    """The output must be what was asked for, with no other format inside."""
    size = target.stored_size()
    try:
        stored = inspect_reader(target.read_at, size)
    except FormatError as error:
        raise ConversionFailed(f"converted image is unreadable: {error}") from error
    unexpected = stored.format != stored_format or (stored_format == "raw" and stored.matches)
    if unexpected or stored.virtual_size != virtual_size:
        raise ConversionFailed(
            f"converted image in unexpected format: {stored.format} (matches {list(stored.matches)}), "
            f"virtual size {stored.virtual_size}, expected {stored_format} of {virtual_size}"
        )
    return stored


def _timed(function: Callable[..., object], *args: object) -> float:
    started = time.monotonic()
    function(*args)
    return time.monotonic() - started


@dataclass(frozen=True, slots=True)
class _Writing:
    """One conversion from qemu-img on: what it writes into and reports to."""

    request: ConvertRequest
    judged: _Judged
    store: Store
    target: Any
    report: Progress
    cancel: CancelToken
    timings: dict[str, float]


def _seal_reinspect_and_hash(run: _Writing) -> Checksums:
    """Seal the written image (file: fsync; RBD: snapshot + protect; S3:
    upload the parts), re-inspect it meanwhile and hash it: beside the seal
    where sealing leaves what is read alone (file, S3: the staged file is
    hashed while its parts go up), after it where the sealed image is a
    frozen copy (RBD's snapshot, the bytes clones are served from).

    The re-inspection is a few small reads and sealing mostly waiting (on
    RBD for a monitor round, up to a second), so they overlap. qemu-img has
    exited and nothing else writes a temporary image, so the head it reads is
    the data the seal freezes.
    """
    step = time.monotonic()
    stop_sealing = CancelToken(parent=run.cancel)
    checksums = None
    with ThreadPoolExecutor(1, thread_name_prefix="seal") as pool:
        sealing = pool.submit(_timed, run.store.seal, run.target, stop_sealing)
        try:
            stored_size = int(run.target.stored_size())
            _reinspect(run.target, run.request.to_format, run.judged.virtual_size)
            run.timings["reinspect"] = time.monotonic() - step
            if not run.store.capabilities.hashes_after_seal:
                checksums = _hash_beside_seal(run, stored_size, sealing)
            run.timings["seal"] = sealing.result()
        except BaseException:
            # The re-inspection or the hashing failed, or an interrupt or a
            # time limit landed: a long seal (S3's upload) stops at its next
            # part, and it is waited for (through any further interrupt), so
            # the caller's abort never races a snapshot being created or a
            # part being sent; the seal's own failure at the same moment does
            # not replace this error.
            stop_sealing.cancel()
            _outwait(sealing)
            raise
    if checksums is None:
        run.cancel.raise_if_cancelled()
        step = time.monotonic()
        checksums = _read_back(run, stored_size, lambda: run.cancel.cancelled)
        run.timings["checksum"] = time.monotonic() - step
    return checksums


def _outwait(running: Future[Any]) -> None:
    """Wait for a step's thread to end, also when a second interrupt or a
    time limit lands meanwhile (the abort that follows must not race it):
    the error already on its way out is the one raised."""
    while True:
        try:
            wait([running])
            return
        except BaseException:  # noqa: BLE001 - a later stop adds nothing to the first
            continue


def _hash_beside_seal(run: _Writing, stored_size: int, sealing: Future[float]) -> Checksums:
    """Hash while the seal runs; a seal that fails (the gateway went away)
    stops the hashing, and its error is the one the caller sees."""
    step = time.monotonic()

    def stop() -> bool:
        return run.cancel.cancelled or (sealing.done() and sealing.exception() is not None)

    try:
        checksums = _read_back(run, stored_size, stop)
    except InterruptedError:
        if not run.cancel.cancelled:
            sealing.result()  # raises the seal's error
        raise
    run.timings["checksum"] = time.monotonic() - step
    return checksums


def _read_back(run: _Writing, unsealed_size: int, stop: Callable[[], bool]) -> Checksums:
    """Hash the stored image: one pass over its allocated data (on RBD from
    the protected snapshot), every digest asked for fed from each read.
    Without hashes nothing is read (not even the snapshot opened) and only
    the size the re-inspection saw is known."""
    request, target, report = run.request, run.target, run.report
    if not (request.full_hashes or request.sparse_hash):
        return Checksums(size=unsealed_size)
    stored_size = target.stored_size()
    report("checksum", 0.0)
    return hash_image(
        stored_size,
        list(target.extents()),
        target.read_at,
        full=request.full_hashes,
        sparse=request.sparse_hash,
        progress=lambda done: report("checksum", 100.0 * done / max(1, stored_size)),
        cancelled=stop,
    )


def convert_image(
    request: ConvertRequest,
    store: Store,
    *,
    progress: Progress | None = None,
    cancel: CancelToken | None = None,
    inspected: ImageInfo | None = None,
    on_sealed: Callable[[Checksums], object] | None = None,
) -> ConvertResult:
    """Run the whole conversion of `request.source` into `store`.

    `inspected` (facts the caller already has) is taken only with
    `request.source_fd`, the descriptor they were read from. `on_sealed`
    gets the checksums of the sealed image before it takes the real name
    (the pipeline records them there, so a delivery that dies right after
    the rename leaves them behind for the next one).
    """
    if request.to_format not in TARGET_FORMATS:
        raise ValueError(f"cannot convert to {request.to_format}")
    if request.to_format not in store.capabilities.keeps_formats:
        raise ValueError(f"the {store.name} store keeps {', '.join(sorted(store.capabilities.keeps_formats))} only")
    if inspected is not None and request.source_fd is None:
        raise ValueError("inspected facts need the descriptor they were read from (source_fd)")
    with contextlib.ExitStack() as opened:
        fd = request.source_fd
        if fd is None:
            fd = open_source(request.source)
            opened.callback(os.close, fd)
        return _convert_open(request, fd, opened, store, progress, cancel or CancelToken(), inspected, on_sealed)


@dataclass(frozen=True, slots=True)
class _Judged:
    """An image the policy let through, with how qemu-img must open it."""

    info: ImageInfo
    verdict: Verdict
    spec: ImageSpec
    virtual_size: int


def _judge(
    request: ConvertRequest,
    fd: int,
    opened: contextlib.ExitStack,
    inspected: ImageInfo | None,
    timings: dict[str, float],
) -> _Judged:
    """inspect -> policy -> (key); qemu-img's cross-check comes next."""
    started = time.monotonic()
    try:
        info = inspected or inspect_fd(fd, filename=request.source, allocation=True)
    except FormatError as error:
        raise refuse("malformed", str(error)) from error
    verdict = require_safe(check(info, request.policy, request.claimed))
    if info.encrypted and request.key_file is None:
        raise refuse("encrypted", f"encrypted {info.format} image: converting it needs the key", verdict)
    key_fd = None
    if info.encrypted and request.key_file is not None:
        key_fd = open_key_file(request.key_file)
        opened.callback(os.close, key_fd)
    timings["inspect"] = time.monotonic() - started
    spec, virtual_size = source_spec(info, fd, key_fd)
    return _Judged(info, verdict, spec, virtual_size)


# What a store's begin raises when the store itself answers no (full,
# away, misconfigured): the cross-check's refusal at the same moment wins
# over it. Anything else (an interrupt, a time limit, a bug) is not waited on.
_STORE_ANSWERS = (StoreError, OSError)


def _begin_beside_cross_check(
    request: ConvertRequest, judged: _Judged, store: Store, cancel: CancelToken, timings: dict[str, float]
) -> Any:
    """Create the store's temporary target while qemu-img's cross-check runs.

    Both are mostly waiting (a qemu-img process; on RBD a few cluster round
    trips), so they overlap. Nothing is written into the target and qemu-img
    does not convert before the cross-check has agreed: when it refuses the
    image, the empty target is removed and the refusal is what the caller
    sees, also when the store failed meanwhile (the image's fault comes
    before store trouble, as when the two ran one after the other). Whatever
    else leaves here (Ctrl-C, SIGTERM, a worker's time limit, cancelling the
    conversion) kills the cross-check's qemu-img at once and is what the
    caller sees.
    """
    stop_checking = CancelToken(parent=cancel)
    target = None
    with ThreadPoolExecutor(1, thread_name_prefix="cross-check") as pool:
        checking = pool.submit(_timed, cross_check, judged.info, judged.spec, judged.virtual_size, stop_checking)
        step = time.monotonic()
        try:
            try:
                target = store.begin(request.image_id, judged.virtual_size, image_format=request.to_format)
            except _STORE_ANSWERS:
                checking.result()  # a refusal wins over the store's error
                raise
            timings["begin"] = time.monotonic() - step
            timings["cross_check"] = checking.result()
        except BaseException:
            # Not another minute of qemu-img (the pool's exit waits for it
            # to be killed), then the empty target goes.
            stop_checking.cancel()
            if target is not None:
                store.abort(target)
            raise
    return target


def _convert_open(
    request: ConvertRequest,
    fd: int,
    opened: contextlib.ExitStack,
    store: Store,
    progress: Progress | None,
    cancel: CancelToken,
    inspected: ImageInfo | None,
    on_sealed: Callable[[Checksums], object] | None = None,
) -> ConvertResult:
    timings: dict[str, float] = {}
    started = time.monotonic()
    report = progress or (lambda stage, percent: None)
    report("inspect", 0.0)
    judged = _judge(request, fd, opened, inspected, timings)
    cancel.raise_if_cancelled()
    target = _begin_beside_cross_check(request, judged, store, cancel, timings)
    try:
        checksums = _write_and_seal(_Writing(request, judged, store, target, report, cancel, timings))
        if on_sealed is not None:
            on_sealed(checksums)
        location = store.finalize(target)
    except BaseException:
        store.abort(target)
        raise
    timings["total"] = time.monotonic() - started
    report("done", 100.0)
    return ConvertResult(
        image_id=request.image_id,
        location=location,
        source=judged.info,
        stored_format=request.to_format,
        virtual_size=judged.virtual_size,
        checksums=checksums,
        verdict=judged.verdict,
        qemu_virtual_size=judged.info.virtual_size,
        publish_sparse=request.sparse_hash,
        timings=timings,
    )


def _write_and_seal(run: _Writing) -> Checksums:
    """qemu-img writes the target; the store seals it while one read of the
    stored data re-inspects and hashes it (see _seal_reinspect_and_hash)."""
    # Cancelled while the cross-check ran (which it then did not hear in
    # time): qemu-img convert does not start.
    run.cancel.raise_if_cancelled()
    run.report("convert", 0.0)
    step = time.monotonic()
    judged, to_file = run.judged, run.store.capabilities.local_target
    try:
        qemu_img.convert(
            judged.spec,
            run.target.qemu_target(),
            run.request.to_format,
            convert_limits(judged.virtual_size, to_file=to_file, timeout=run.request.timeout),
            options=run.request.options,
            progress=lambda percent: run.report("convert", percent),
            cancel=run.cancel,
        )
    except QemuImgError as error:
        raise _failed(error, run.store) from error
    run.timings["convert"] = time.monotonic() - step
    run.cancel.raise_if_cancelled()
    checksums = _seal_reinspect_and_hash(run)
    run.cancel.raise_if_cancelled()
    return checksums
