"""Peak memory of diskpipe's own process stays under 256 MiB whatever the
input: a few MB of upload must not buy hundreds of MB.

One fresh child process (tests/memprobe.py) inspects, streams, validates,
unpacks and imports many small adversarial inputs (tests/adversarial.py)
and every sample image, and reports its VmHWM for each case, the peak reset
in between. The whole process counts: interpreter, numpy, codecs and all;
qemu-img runs in a process of its own with its own limits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import adversarial

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
PROCESS_CAP = 256 * MiB
PROBE_TIMEOUT = 900  # the probe's own per-case guard is 120 s; this is the whole run's
COMPRESSED = ("gzip", "bzip2", "xz", "zstd", "ova")
# Bombs unpack under this cap: the test is about memory, not the decompression caps.
MAX_DECOMPRESSED = 1 << 30


def cases_for(directory: Path, samples_dir: Path, manifest: list[Any]) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    for name, data in adversarial.build(directory).items():
        path = str(directory / name)
        Path(path).write_bytes(data)
        cases += [
            {"name": name, "action": "inspect", "path": path},
            {"name": name, "action": "stream", "path": path, "chunk": 1 << 20},
            {"name": name, "action": "stream", "path": path, "chunk": 4093},
            {"name": name, "action": "validate", "path": path, "chunk": 64 << 20},
        ]
        if name.startswith(COMPRESSED):
            # The whole embedded import: fetch, unpack, inspect, qemu-img, hash, verify.
            cases.append({"name": name, "action": "import", "path": path})
    for entry in manifest:
        path = str(samples_dir / entry.file)
        cases.append({"name": entry.name, "action": "inspect", "path": path})
        if os.path.getsize(path) <= 4 * MiB:
            cases.append({"name": entry.name, "action": "validate", "path": path, "chunk": 4096})
    return cases


@pytest.fixture(scope="module")
def probed(
    tmp_path_factory: pytest.TempPathFactory, samples_dir: Path, manifest: list[Any]
) -> tuple[int, list[dict[str, Any]], Path]:
    work = tmp_path_factory.mktemp("memory")
    inputs = work / "inputs"
    inputs.mkdir()
    request = {
        "settings": {
            "staging": str(work / "staging"),
            "store": str(work / "store"),
            "records": str(work / "records.sqlite"),
            "max_decompressed": MAX_DECOMPRESSED,
        },
        "cases": cases_for(inputs, samples_dir, manifest),
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "memprobe.py")],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT,
        check=False,
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert lines and "baseline" in lines[0], done.stderr
    results = lines[1:]
    assert len(results) == len(request["cases"]), f"the probe died: {done.stderr[-2000:]}"
    report = work / "memory-report.txt"
    report.write_text(render(lines[0]["baseline"], results))
    print(report.read_text())
    return lines[0]["baseline"], results, work


def render(baseline: int, results: list[dict[str, Any]]) -> str:
    rows = [f"baseline (everything imported): {baseline / MiB:.1f} MiB"]
    for result in sorted(results, key=lambda item: -item["peak"])[:25]:
        rows.append(
            f"{result['peak'] / MiB:7.1f} MiB  {result['seconds']:6.2f} s  {result['action']:<8} {result['name']:<34} "
            f"{result['outcome'].splitlines()[0][:90]}"
        )
    return "\n".join(rows) + "\n"


def test_no_input_makes_the_process_exceed_256_mib(probed: tuple[int, list[dict[str, Any]], Path]) -> None:
    baseline, results, _ = probed
    over = [
        f"{item['action']} {item['name']}: {item['peak'] / MiB:.0f} MiB"
        for item in results
        if item["peak"] >= PROCESS_CAP
    ]
    assert not over, f"baseline {baseline / MiB:.0f} MiB; over the cap: {over}"


def test_every_adversarial_input_ends_in_a_verdict(probed: tuple[int, list[dict[str, Any]], Path]) -> None:
    """No hang, no unexpected exception: a refusal, a record, or facts."""
    _, results, _ = probed
    broken = [
        f"{item['action']} {item['name']}: {item['outcome']}"
        for item in results
        if item["outcome"].startswith(("crash", "hang"))
        or (item["action"] == "import" and not item["outcome"].startswith(("active", "killed: refused")))
    ]
    assert not broken, "\n".join(broken)


def test_nothing_is_left_in_staging_or_the_store(probed: tuple[int, list[dict[str, Any]], Path]) -> None:
    _, results, work = probed
    staging = work / "staging"
    assert not staging.exists() or os.listdir(staging) == []
    active = {
        f"{item['name']}.raw" for item in results if item["action"] == "import" and item["outcome"].startswith("active")
    }
    store = work / "store"
    assert set(os.listdir(store) if store.exists() else []) == active
