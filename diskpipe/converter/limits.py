"""Resource limits and lifetime rules for every qemu-img child.

Each child runs in its own session (so cancelling kills its whole process
group), dies with its parent (PR_SET_PDEATHSIG), and gets address-space, CPU
time and file-size caps, `convert` included (OpenStack caps only `info`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass

PR_SET_PDEATHSIG = 1
GiB = 1 << 30


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps for one child process; None leaves a limit unset."""

    address_space: int | None = None  # bytes (RLIMIT_AS)
    cpu_seconds: int | None = None  # RLIMIT_CPU
    file_size: int | None = None  # bytes any one file may grow to (RLIMIT_FSIZE)
    timeout: float | None = None  # wall-clock seconds, enforced by the parent


# `qemu-img info` only parses headers: OpenStack's limits (1 GiB, 30 s) fit.
INFO_LIMITS = Limits(address_space=1 * GiB, cpu_seconds=30, timeout=120)
# `convert` into RBD maps librbd's and librados' thread stacks and caches: a
# measured run peaks near 1.4 GiB of address space, so 4 GiB leaves room
# without letting a hostile image allocate without bound.
CONVERT_ADDRESS_SPACE = 4 * GiB


def convert_limits(virtual_size: int, *, to_file: bool, timeout: float | None = None) -> Limits:
    """Limits for converting an image of `virtual_size` bytes.

    CPU time grows with the data (decompression is the costly part: a few
    seconds per GiB here), with a floor for small images. When the output
    is a file, it may not grow past the virtual size plus qcow2 metadata.
    """
    gibibytes = max(1, -(-virtual_size // GiB))
    cpu_seconds = 120 + 60 * gibibytes
    file_size = virtual_size + virtual_size // 64 + 64 * 1024 * 1024 if to_file else None
    return Limits(
        address_space=CONVERT_ADDRESS_SPACE,
        cpu_seconds=cpu_seconds,
        file_size=file_size,
        timeout=timeout if timeout is not None else float(4 * cpu_seconds),
    )


def _prctl() -> Callable[..., int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    function: Callable[..., int] = libc.prctl
    return function


_PRCTL = _prctl()


def child_setup(limits: Limits) -> Callable[[], None]:
    """A `preexec_fn` applying the limits in the child before exec."""

    parent = os.getpid()

    def apply() -> None:
        # Die with the parent: a killed worker must not leave qemu-img writing.
        if _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:
                os._exit(125)  # the parent already died between fork and prctl
        if limits.address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limits.address_space, limits.address_space))
        if limits.cpu_seconds is not None:
            resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
        if limits.file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size, limits.file_size))
        # No core dumps of a crashing qemu-img full of guest data.
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply
