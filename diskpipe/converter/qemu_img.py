"""The only place that builds qemu-img command lines and runs them.

Every call passes the format explicitly (`driver=` in image options) so
qemu never probes, and names every image by a descriptor diskpipe opened
(see ImageSpec and TargetSpec) so qemu never interprets a name a user
chose; runs under `limits`; can be cancelled (the whole process group is
killed); reports `-p` progress through a callback; keeps qemu's stderr for
the error it raises.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from diskpipe.converter.limits import INFO_LIMITS, Limits, limited_command

STDERR_KEPT = 16 * 1024  # the tail of qemu's stderr kept for the error
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


class QemuImgError(RuntimeError):
    """qemu-img failed; the message carries its stderr."""

    def __init__(self, command: Sequence[str], returncode: int | None, stderr: str, reason: str = "") -> None:
        self.command = list(command)
        self.returncode = returncode
        self.stderr = stderr
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        why = reason or (
            f"exit status {returncode}"
            if returncode is not None and returncode >= 0
            else f"killed by signal {-(returncode or 0)}"
        )
        super().__init__(
            f"qemu-img {command[1] if len(command) > 1 else ''} failed ({why}){': ' + detail if detail else ''}"
        )


class Cancelled(Exception):
    """The operation was cancelled; nothing it started is left running."""


@dataclass
class CancelToken:
    """Set from any thread to stop a running qemu-img (and the steps after it).

    A token with a `parent` (one step's stop inside a whole conversion's) is
    cancelled by its own `cancel` or whenever the parent is; cancelling it
    leaves the parent alone.
    """

    event: threading.Event = field(default_factory=threading.Event)
    parent: CancelToken | None = None

    def cancel(self) -> None:
        self.event.set()

    @property
    def cancelled(self) -> bool:
        return self.event.is_set() or (self.parent is not None and self.parent.cancelled)

    def raise_if_cancelled(self) -> None:
        if self.cancelled:
            raise Cancelled("cancelled")


def qemu_img_binary() -> str:
    found = os.environ.get("DISKPIPE_QEMU_IMG") or shutil.which("qemu-img")
    if not found:
        raise FileNotFoundError("qemu-img not found (install qemu-utils)")
    return found


def _escape_option(value: str) -> str:
    """qemu's option syntax doubles commas inside values."""
    return value.replace(",", ",,")


_DRIVER_NAME = re.compile(r"[a-z0-9_]+")
_OPTION_KEY = re.compile(r"[A-Za-z0-9_.-]+")


def _descriptor_name(fd: int) -> str:
    """How qemu-img reaches a descriptor diskpipe opened: `/dev/fd/N` has no
    `:` before its first `/`, so qemu cannot read a protocol into it, and
    opening it reopens the very file behind the descriptor, not a path."""
    if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
        raise ValueError(f"not a file descriptor: {fd!r}")
    os.fstat(fd)  # an OSError now beats qemu opening whatever gets that number later
    return f"/dev/fd/{fd}"


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """A source image for qemu-img: a descriptor diskpipe opened, the format
    the inspector found, and driver options.

    There is no path to set: qemu-img gets `--image-opts
    driver=FORMAT,...,file.driver=file,file.filename=/dev/fd/N`, so it never
    probes, never parses a name (`json:{...}`, `nbd:`, `file:`...) and reads
    the bytes that were inspected. The caller keeps the descriptor open until
    qemu-img is done, and closes it.
    """

    fd: int
    format: str
    options: tuple[tuple[str, str], ...] = ()
    secret_fd: int | None = None  # an open passphrase file, made the secret object `sec0`

    def __post_init__(self) -> None:
        _descriptor_name(self.fd)
        if self.secret_fd is not None:
            _descriptor_name(self.secret_fd)
        if not _DRIVER_NAME.fullmatch(self.format):
            raise ValueError(f"not a qemu driver name: {self.format!r}")
        for key, _ in self.options:
            if not _OPTION_KEY.fullmatch(key) or key.startswith(("driver", "file.")):
                raise ValueError(f"not a driver option diskpipe sets: {key!r}")

    @property
    def pass_fds(self) -> tuple[int, ...]:
        """The descriptors the qemu-img child must inherit."""
        return (self.fd,) if self.secret_fd is None else (self.fd, self.secret_fd)

    def object_args(self) -> list[str]:
        if self.secret_fd is None:
            return []
        return ["--object", f"secret,id=sec0,file={_descriptor_name(self.secret_fd)}"]

    def source_args(self, *, no_backing: bool = False) -> list[str]:
        """`no_backing` adds `backing=` (qemu 7.2: open no backing file): a
        second lock behind the policy for the conversion. `info` leaves it
        out, so that the cross-check still sees any backing file qemu would
        follow and can disagree with the inspector."""
        rendered = "".join(f"{key}={_escape_option(value)}," for key, value in self.options)
        if no_backing:
            rendered += "backing=,"
        return [
            "--image-opts",
            f"driver={self.format},{rendered}file.driver=file,file.filename={_descriptor_name(self.fd)}",
        ]


@dataclass(frozen=True, slots=True)
class TargetSpec:
    """Where qemu-img convert writes: a descriptor diskpipe opened on a file
    it created (`/dev/fd/N`, qemu writes the format into it), or an `rbd:`
    filename the RBD store built from its pool and a checked image name
    (qemu writes into an image the store created). Built only through
    `descriptor` and `rbd`."""

    filename: str
    fd: int | None
    created_by_qemu: bool

    def __post_init__(self) -> None:
        if self.fd is not None:
            if self.filename != _descriptor_name(self.fd) or not self.created_by_qemu:
                raise ValueError(f"a descriptor target is /dev/fd/{self.fd}, created by qemu-img")
        elif not self.filename.startswith("rbd:") or self.created_by_qemu:
            raise ValueError(f"not an rbd: target the store created: {self.filename!r}")

    @classmethod
    def descriptor(cls, fd: int) -> TargetSpec:
        return cls(_descriptor_name(fd), fd, True)

    @classmethod
    def rbd(cls, filename: str) -> TargetSpec:
        return cls(filename, None, False)

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return () if self.fd is None else (self.fd,)


def run(
    args: Sequence[str],
    limits: Limits,
    *,
    progress: Callable[[float], None] | None = None,
    cancel: CancelToken | None = None,
    env: dict[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
) -> str:
    """Run qemu-img with `args`; return its stdout. Raises QemuImgError,
    Cancelled, or QemuImgError with reason "timed out"."""
    command = [qemu_img_binary(), *args]
    process = _spawn(command, limits, env, pass_fds)
    assert process.stdout is not None and process.stderr is not None
    deadline = time.monotonic() + limits.timeout if limits.timeout else None
    reason = ""
    try:
        stdout, stderr, reason = _collect(process, deadline, progress, cancel)
    except BaseException:
        # Interrupted (Ctrl-C, a time limit): qemu-img runs in its own
        # session, so it must be killed here or it would go on writing.
        _kill_group(process)
        raise
    finally:
        if reason:
            _kill_group(process)
        returncode = process.wait()
        process.stdout.close()
        process.stderr.close()
    error_text = stderr[-STDERR_KEPT:].decode("utf-8", "replace")
    if reason == "cancelled":
        raise Cancelled("qemu-img was cancelled")
    if reason:
        raise QemuImgError(command, None, error_text, reason=f"{reason} after {limits.timeout:.0f} s")
    if returncode != 0:
        raise QemuImgError(command, returncode, error_text)
    return stdout.decode("utf-8", "replace")


def _spawn(
    command: list[str], limits: Limits, env: dict[str, str] | None, pass_fds: tuple[int, ...]
) -> subprocess.Popen[bytes]:
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("LC_ALL", "C")  # stable, parseable messages
    return subprocess.Popen(
        limited_command(command, limits),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
        pass_fds=pass_fds,
        env=child_env,
    )


def _collect(
    process: subprocess.Popen[bytes],
    deadline: float | None,
    progress: Callable[[float], None] | None,
    cancel: CancelToken | None,
) -> tuple[bytearray, bytearray, str]:
    """Read qemu-img's stdout and stderr until both end; returns them and
    why reading stopped early ("cancelled", "timed out"; "" when it did not)."""
    assert process.stdout is not None and process.stderr is not None
    stdout = bytearray()
    stderr = bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ, lambda chunk: _keep_stdout(stdout, chunk, progress))
        selector.register(process.stderr, selectors.EVENT_READ, lambda chunk: _keep_stderr(stderr, chunk))
        while selector.get_map():
            if cancel is not None and cancel.cancelled:
                return stdout, stderr, "cancelled"
            if deadline is not None and time.monotonic() > deadline:
                return stdout, stderr, "timed out"
            for key, _ in selector.select(timeout=0.2):
                chunk = os.read(key.fd, 65536)
                if chunk:
                    key.data(chunk)
                else:
                    selector.unregister(key.fileobj)
    return stdout, stderr, ""


def _keep_stdout(stdout: bytearray, chunk: bytes, progress: Callable[[float], None] | None) -> None:
    stdout += chunk
    if progress is not None:
        found = _PROGRESS.findall(chunk)
        if found:
            progress(float(found[-1]))
        # Progress lines are all a convert prints: keep only recent ones.
        del stdout[: max(0, len(stdout) - 4096)]


def _keep_stderr(stderr: bytearray, chunk: bytes) -> None:
    stderr += chunk
    if len(stderr) > 4 * STDERR_KEPT:
        del stderr[: len(stderr) - STDERR_KEPT]


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def info(image: ImageSpec, *, limits: Limits = INFO_LIMITS, cancel: CancelToken | None = None) -> dict[str, Any]:
    """`qemu-img info --output=json` with the format given, never probed.

    `--force-share` lets it read an image another process holds open.
    """
    output = run(
        ["info", *image.object_args(), "--output=json", "--force-share", *image.source_args()],
        limits,
        cancel=cancel,
        pass_fds=image.pass_fds,
    )
    result: dict[str, Any] = json.loads(output)
    return result


@dataclass(frozen=True, slots=True)
class ConvertOptions:
    """qemu-img convert's tuning knobs, chosen by measurement (see
    benchmarks/convert_speed.py): out-of-order writes and 16 coroutines
    keep librbd's queue full; 4 KiB sparse detection keeps the target thin."""

    out_of_order: bool = True  # -W
    coroutines: int = 16  # -m
    sparse_size: str = "4k"  # -S
    target_cache: str | None = None  # -t (None: qemu's default, writeback)
    source_cache: str | None = None  # -T


def convert_args(
    source: ImageSpec,
    target: TargetSpec,
    target_format: str,
    *,
    options: ConvertOptions,
    target_options: Sequence[str] = (),
    progress: bool = True,
) -> list[str]:
    """The argument list for one conversion (kept separate so tests can see it)."""
    args = ["convert", *source.object_args()]
    if progress:
        args.append("-p")
    if options.out_of_order:
        args.append("-W")
    args += ["-m", str(options.coroutines), "-S", options.sparse_size]
    if options.target_cache:
        args += ["-t", options.target_cache]
    if options.source_cache:
        args += ["-T", options.source_cache]
    if not target.created_by_qemu:
        # The target was created empty by the store: skip creating it and
        # skip writing zeros into it.
        args += ["-n", "--target-is-zero"]
    for option in target_options:
        args += ["-o", option]
    args += [*source.source_args(no_backing=True), "-O", target_format, target.filename]
    return args


def convert(
    source: ImageSpec,
    target: TargetSpec,
    target_format: str,
    limits: Limits,
    *,
    options: ConvertOptions | None = None,
    target_options: Sequence[str] = (),
    progress: Callable[[float], None] | None = None,
    cancel: CancelToken | None = None,
) -> None:
    args = convert_args(
        source,
        target,
        target_format,
        options=options or ConvertOptions(),
        target_options=target_options,
        progress=progress is not None,
    )
    run(args, limits, progress=progress, cancel=cancel, pass_fds=source.pass_fds + target.pass_fds)
