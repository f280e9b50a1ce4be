"""Many files in one call: the per-file JSON entries `diskpipe info` prints,
in the order the files were given, inspected on several processes when
there are enough of them to repay the workers' start.

Each entry is the image's `ImageInfo.to_json()` with the policy's verdict
merged in (`safe`, `issues`, `notes`), or, for a file that could not be
inspected, `{"filename", "error", "safe": false}`. A broken image (a
`FormatError`) and a file that cannot be read (an `OSError`) both give such
an error entry; `Inspected.problem` tells them apart, because the command's
exit code does (1 refused, 2 unreadable).
"""

from __future__ import annotations

import os

from diskpipe.formats.api import inspect
from diskpipe.formats.errors import FormatError
from diskpipe.formats.policy import Policy, check, load_policy

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see tuples.py)
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any, NamedTuple
else:
    from diskpipe.formats.tuples import NamedTuple

REFUSED = "refused"  # the file is not an image diskpipe can read (FormatError)
UNREADABLE = "unreadable"  # the file could not be opened or read (OSError)

# Below this many files the workers' start (a fork each, and the imports of
# multiprocessing: ~20 ms) costs more than it saves: one process does them.
PARALLEL_FROM = 64
# Files handed to a worker at a time: large enough that the round trips are
# a small part of the work (an inspection takes ~0.1-0.3 ms), small enough
# that one slow file does not leave the other workers idle at the end.
CHUNK = 16


class Inspected(NamedTuple):
    """One file's JSON entry and, if it failed, why."""

    entry: dict[str, Any]
    problem: str | None = None  # None, REFUSED or UNREADABLE


def describe(path: str, policy: Policy, *, allocation: bool = False, details: bool = False) -> Inspected:
    """The entry `diskpipe info` prints for one file."""
    try:
        info = inspect(path, allocation=allocation, details=details)
        entry = info.to_json()
        if not details:
            entry.pop("details", None)
        entry.update(check(info, policy).to_json())
        return Inspected(entry)
    except FormatError as error:
        return Inspected({"filename": path, "error": str(error), "safe": False}, REFUSED)
    except OSError as error:
        return Inspected({"filename": path, "error": f"{error.strerror or error}", "safe": False}, UNREADABLE)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def idle_cpus() -> int:
    """Usable CPUs that other processes leave free (the one-minute load
    average taken off), at least one: workers on busy CPUs only add their
    start-up and the results' transfer to the same work."""
    cpus = usable_cpus()
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average on this system
        return cpus
    return max(1, min(cpus, round(cpus - load)))


def worker_count(files: int, jobs: int | None) -> int:
    """How many processes inspect `files` files: `jobs` when given (at most
    one per file), else one per idle CPU once there are PARALLEL_FROM files."""
    if jobs is not None:
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, not {jobs}")
        return max(1, min(jobs, files))
    if files < PARALLEL_FROM:
        return 1
    return max(1, min(idle_cpus(), files // CHUNK))


def inspect_many(
    paths: Sequence[str],
    *,
    jobs: int | None = None,
    allocation: bool = False,
    details: bool = False,
    policy: Policy | None = None,
) -> list[Inspected]:
    """Inspect and judge every path; results in the order of `paths`.

    `policy`: None reads the configuration's `[policy]` (as `load_policy()`).
    `jobs`: worker processes (None: automatic, see `worker_count`; 1: this
    process alone). Workers are forked, so they start with what this process
    has loaded and cost no imports; a process with other threads running
    (a worker thread, a server) inspects on its own instead, because forking
    it could copy a lock some other thread holds.
    """
    chosen = load_policy() if policy is None else policy
    workers = worker_count(len(paths), jobs)
    if workers > 1 and _may_fork():
        return _in_workers(paths, workers, chosen, allocation=allocation, details=details)
    return [describe(path, chosen, allocation=allocation, details=details) for path in paths]


def _may_fork() -> bool:
    import threading

    return hasattr(os, "fork") and threading.active_count() == 1


def _in_workers(
    paths: Sequence[str], workers: int, policy: Policy, *, allocation: bool, details: bool
) -> list[Inspected]:
    import multiprocessing
    from functools import partial

    judge = partial(describe, policy=policy, allocation=allocation, details=details)
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return list(pool.imap(judge, paths, chunksize=CHUNK))
