"""Part of benchmarks.inspect_speed: `diskpipe info` on 1,000 files in one
call against 1,000 `qemu-img info` calls, the way a script checks a
directory of uploads.

The 1,000 files are hard links to the sample corpus, cycled (every format,
honest and hostile), so all candidates read the same bytes from the page
cache. Candidates, interleaved:
- `diskpipe info --output=json FILE...` (one process; with `--jobs` when
  the command has it, its default otherwise);
- the same entries from `diskpipe.formats.batch.inspect_many` in one fresh
  interpreter, printed as JSON: what `diskpipe info` runs for many files,
  without the command line around it;
- a shell-style loop of `qemu-img info --output=json FILE`, one process each.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.common import WORK, Timing, interleaved

FILES = 1000
QEMU_TIMEOUT = 60

INSPECT_MANY = (
    "import json, sys\n"
    "from diskpipe.formats.batch import inspect_many\n"
    "print(json.dumps([result.entry for result in inspect_many(sys.argv[1:])], indent=2))\n"
)


def link_farm(paths: list[str], count: int = FILES, directory: Path = WORK / "many-files") -> list[str]:
    """`count` hard links cycling through `paths`, named in order."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    links = []
    for index in range(count):
        source = Path(paths[index % len(paths)])
        link = directory / f"{index:04d}-{source.name}"
        os.link(source, link)
        links.append(str(link))
    return links


def _qemu_loop(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(subprocess.TimeoutExpired):  # a hung qemu-img must not hang the benchmark
            subprocess.run(
                ["qemu-img", "info", "--output=json", path], capture_output=True, timeout=QEMU_TIMEOUT, check=False
            )


def measure(
    corpus_paths: list[str], python: str, diskpipe: str, cwd: Path, repeat: int, count: int = FILES
) -> dict[str, Any]:
    paths = link_farm(corpus_paths, count)
    has_jobs = (
        "--jobs" in subprocess.run([diskpipe, "info", "--help"], capture_output=True, text=True, check=False).stdout
    )
    command = [diskpipe, "info", "--output=json", *(["--jobs", str(os.cpu_count() or 1)] if has_jobs else []), *paths]

    def run(args: list[str]) -> Any:
        return lambda: subprocess.run(args, capture_output=True, cwd=cwd, check=False)

    candidates = {
        "diskpipe info (one call)": run(command),
        "inspect_many (one interpreter)": run([python, "-c", INSPECT_MANY, *paths]),
        "qemu-img info (one call per file)": lambda: _qemu_loop(paths),
    }
    for candidate in candidates.values():  # warm-up: page cache, .pyc files
        candidate()
    timings: dict[str, Timing] = interleaved(candidates, repeat)
    qemu = timings["qemu-img info (one call per file)"].median
    shutil.rmtree(WORK / "many-files", ignore_errors=True)
    return {
        "files": count,
        "cli_has_jobs": has_jobs,
        "timings": {name: timing.to_json() for name, timing in timings.items()},
        "speedup_cli": qemu / timings["diskpipe info (one call)"].median,
        "speedup_inspect_many": qemu / timings["inspect_many (one interpreter)"].median,
    }


def render(data: dict[str, Any]) -> list[str]:
    lines = [
        f"## {data['files']} files in one call",
        "",
        f"{data['files']} hard links cycling through the corpus; median of the interleaved runs (min–max). "
        + (
            "`diskpipe info` ran with `--jobs` (one worker per CPU)."
            if data["cli_has_jobs"]
            else "This `diskpipe info` has no `--jobs` yet: it inspects in one process; `inspect_many` picks its "
            "workers itself (one per idle CPU from 64 files: the load average taken off the CPU count)."
        ),
        "",
        "| candidate | time | vs qemu-img |",
        "|---|---:|---:|",
    ]
    qemu = data["timings"]["qemu-img info (one call per file)"]["median"]
    for name, timing in data["timings"].items():
        lines.append(
            f"| {name} | {timing['median']:.2f} s ({timing['min']:.2f}–{timing['max']:.2f}) | "
            f"{qemu / timing['median']:.1f}× |"
        )
    return [*lines, ""]
