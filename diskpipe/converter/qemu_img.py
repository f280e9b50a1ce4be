"""The only place that builds qemu-img command lines and runs them.

Every call passes the format explicitly (`-f`, or `driver=` in image
options) so qemu never probes; runs under `limits`; can be cancelled (the
whole process group is killed); reports `-p` progress through a callback;
keeps qemu's stderr for the error it raises.
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

from diskpipe.converter.limits import INFO_LIMITS, Limits, child_setup

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
    """Set from any thread to stop a running qemu-img (and the steps after it)."""

    event: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.event.set()

    @property
    def cancelled(self) -> bool:
        return self.event.is_set()

    def raise_if_cancelled(self) -> None:
        if self.event.is_set():
            raise Cancelled("cancelled")


def qemu_img_binary() -> str:
    found = os.environ.get("DISKPIPE_QEMU_IMG") or shutil.which("qemu-img")
    if not found:
        raise FileNotFoundError("qemu-img not found (install qemu-utils)")
    return found


def _escape_option(value: str) -> str:
    """qemu's option syntax doubles commas inside values."""
    return value.replace(",", ",,")


@dataclass(frozen=True, slots=True)
class ImageSpec:
    """An image for qemu-img: a file and its driver, plus driver options.

    Without options it renders as `-f FORMAT PATH`; with options (vpc's
    force_size_calc, a LUKS key) as `--image-opts driver=FORMAT,...`.
    """

    path: str
    format: str
    options: tuple[tuple[str, str], ...] = ()
    secret_file: str | None = None  # a passphrase file, made the secret object `sec0`

    @property
    def pass_fds(self) -> tuple[int, ...]:
        """A source given as /dev/fd/N (an already checked, open file) needs
        that descriptor passed to the child."""
        if self.path.startswith("/dev/fd/") and self.path[8:].isdigit():
            return (int(self.path[8:]),)
        return ()

    def object_args(self) -> list[str]:
        if self.secret_file is None:
            return []
        return ["--object", f"secret,id=sec0,file={_escape_option(self.secret_file)}"]

    def source_args(self) -> list[str]:
        options = list(self.options)
        if not options:
            return ["-f", self.format, self.path]
        rendered = ",".join(f"{key}={_escape_option(value)}" for key, value in options)
        return [
            "--image-opts",
            f"driver={self.format},{rendered},file.driver=file,file.filename={_escape_option(self.path)}",
        ]


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
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("LC_ALL", "C")  # stable, parseable messages
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=child_setup(limits),  # noqa: PLW1509 - rlimits and PDEATHSIG must be set in the child
        start_new_session=True,
        close_fds=True,
        pass_fds=pass_fds,
        env=child_env,
    )
    assert process.stdout is not None and process.stderr is not None
    deadline = time.monotonic() + limits.timeout if limits.timeout else None
    stdout = bytearray()
    stderr = bytearray()
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ, stdout)
    selector.register(process.stderr, selectors.EVENT_READ, stderr)
    reason = ""
    try:
        while selector.get_map():
            if cancel is not None and cancel.cancelled:
                reason = "cancelled"
                break
            if deadline is not None and time.monotonic() > deadline:
                reason = "timed out"
                break
            for key, _ in selector.select(timeout=0.2):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buffer: bytearray = key.data
                buffer += chunk
                if buffer is stdout and progress is not None:
                    found = _PROGRESS.findall(chunk)
                    if found:
                        progress(float(found[-1]))
                    # Progress lines are all a convert prints: keep only recent ones.
                    del stdout[: max(0, len(stdout) - 4096)]
                if buffer is stderr and len(stderr) > 4 * STDERR_KEPT:
                    del stderr[: len(stderr) - STDERR_KEPT]
    except BaseException:
        # Interrupted (Ctrl-C, a time limit): qemu-img runs in its own
        # session, so it must be killed here or it would go on writing.
        _kill_group(process)
        raise
    finally:
        selector.close()
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


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def info(image: ImageSpec, *, limits: Limits = INFO_LIMITS) -> dict[str, Any]:
    """`qemu-img info --output=json` with the format given, never probed.

    `--force-share` lets it read an image another process holds open.
    """
    output = run(
        ["info", *image.object_args(), "--output=json", "--force-share", *image.source_args()],
        limits,
        pass_fds=image.pass_fds,
    )
    result: dict[str, Any] = json.loads(output)
    return result


def map_extents(image: ImageSpec, *, limits: Limits = INFO_LIMITS) -> list[dict[str, Any]]:
    """`qemu-img map --output=json`: the guest extents and whether they hold data."""
    output = run(
        ["map", *image.object_args(), "--output=json", "--force-share", *image.source_args()],
        limits,
        pass_fds=image.pass_fds,
    )
    result: list[dict[str, Any]] = json.loads(output)
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
    target: str,
    target_format: str,
    *,
    options: ConvertOptions,
    create_target: bool,
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
    if not create_target:
        # The target was created empty by the store: skip creating it and
        # skip writing zeros into it.
        args += ["-n", "--target-is-zero"]
    for option in target_options:
        args += ["-o", option]
    args += [*source.source_args(), "-O", target_format, target]
    return args


def convert(
    source: ImageSpec,
    target: str,
    target_format: str,
    limits: Limits,
    *,
    options: ConvertOptions | None = None,
    create_target: bool = True,
    target_options: Sequence[str] = (),
    progress: Callable[[float], None] | None = None,
    cancel: CancelToken | None = None,
) -> None:
    args = convert_args(
        source,
        target,
        target_format,
        options=options or ConvertOptions(),
        create_target=create_target,
        target_options=target_options,
        progress=progress is not None,
    )
    run(args, limits, progress=progress, cancel=cancel, pass_fds=source.pass_fds)


def version() -> str:
    output = run(["--version"], INFO_LIMITS)
    return output.splitlines()[0] if output else ""
