"""Resource limits and lifetime rules for every qemu-img child.

Each child runs in its own session (so cancelling kills its whole process
group), dies with its parent (PDEATHSIG, set by util-linux's setpriv), and gets address-space, CPU
time and file-size caps, `convert` included (OpenStack caps only `info`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

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


def _tool(name: str) -> str:
    found = shutil.which(name) or next(
        (path for path in (f"/usr/bin/{name}", f"/bin/{name}") if os.access(path, os.X_OK)), None
    )
    if found is None:
        raise FileNotFoundError(f"{name} not found (install util-linux): qemu-img is never run without its limits")
    return found


def limited_command(command: Sequence[str], limits: Limits) -> list[str]:
    """`command` wrapped so that the child applies its own limits before it
    becomes qemu-img: util-linux's `setpriv --pdeathsig KILL` (die with the
    parent thread: a killed worker leaves no qemu-img writing) execs
    `prlimit --as/--cpu/--fsize/--core=0` which execs the command.

    This replaces a Python `preexec_fn`: code run between fork and exec in a
    threaded process (a Celery worker with librados and hashing threads)
    can deadlock on a lock another thread held at fork time. Both tools
    exec in place, so the child's pid is qemu-img's. The one gap is a parent
    that dies before setpriv sets the signal (microseconds after the fork);
    qemu-img's CPU cap and the caller's process-group kill bound that case.
    """
    limits_args = ["--core=0"]  # no core dumps of a crashing qemu-img full of guest data
    if limits.address_space is not None:
        limits_args.append(f"--as={limits.address_space}")
    if limits.cpu_seconds is not None:
        limits_args.append(f"--cpu={limits.cpu_seconds}")
    if limits.file_size is not None:
        limits_args.append(f"--fsize={limits.file_size}")
    return [_tool("setpriv"), "--pdeathsig", "KILL", "--", _tool("prlimit"), *limits_args, "--", *command]
