"""Runs many inspections, validations, unpackings and imports in one fresh
process and reports, for each, the peak resident memory of this process
(VmHWM: interpreter, imports and all; qemu-img is a child with its own).

Used by tests/test_memory.py as `python tests/memprobe.py < cases.json`. The
peak is reset between cases (`/proc/self/clear_refs` = 5), so each number is
the highest RSS seen while that case ran, starting from what the process
already held. Output: JSON lines on stdout, first {"baseline": bytes} (the
process with everything imported), then one result per case as it ends.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASE_SECONDS = 120  # a hang guard per case, not a speed test


class Hang(Exception):
    pass


def peak_rss() -> int:
    """This process's peak resident set size in bytes (VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def run_case(case: dict[str, Any], settings: dict[str, Any]) -> str:
    """Run one case; return its outcome ("ok", "refused: ...", "killed: ...")."""
    from diskpipe.converter.stores.file import FileStore
    from diskpipe.formats import FormatError, StreamInspector, inspect
    from diskpipe.formats.policy import Policy, check
    from diskpipe.jobs import sources
    from diskpipe.jobs.pipeline import Environment, ImportJob, run_import
    from diskpipe.jobs.records import SqliteRecords
    from diskpipe.validation import UnsafeImage, ValidatingReader

    action, path = case["action"], case["path"]
    chunk = int(case.get("chunk", 1 << 20))
    config = sources.ImportConfig(
        allowed_dirs=(str(Path(path).parent),),
        staging_dir=settings["staging"],
        max_decompressed=int(settings["max_decompressed"]),
    )
    refusals = (FormatError, UnsafeImage, sources.SourceRefused)
    try:
        if action == "inspect":
            check(inspect(path, allocation=True), Policy())
        elif action == "stream":
            inspector = StreamInspector(allocation=True)
            with open(path, "rb") as source:
                while piece := source.read(chunk):
                    inspector.feed(piece)
                    del piece
            check(inspector.finish(), Policy())
        elif action == "validate":
            with open(path, "rb") as source, ValidatingReader(source, chunk_size=chunk) as reader:
                for _ in reader:
                    pass
        elif action == "unpack":
            staged = sources.open_local(path, config)
            try:
                unpacked, _ = sources.unpack(staged, config, label=case["name"])
                if unpacked is not staged:
                    unpacked.close()
            finally:
                staged.close()
        elif action == "import":
            environment = Environment(
                records=SqliteRecords(settings["records"]),
                store=FileStore(settings["store"]),
                policy=Policy(),
                import_config=config,
                trust_local_paths=True,
            )
            record = run_import(ImportJob(case["name"], path), environment, attempt=f"{case['name']}.1")
            return f"{record['status']}: {record.get('reason') or ''}"
        else:
            raise ValueError(f"unknown action {action}")
    except refusals as error:
        return f"refused: {type(error).__name__}: {str(error)[:160]}"
    return "ok"


def main() -> int:
    request = json.load(sys.stdin)
    settings = request["settings"]

    def fire(signum: int, frame: Any) -> None:
        raise Hang(f"still running after {CASE_SECONDS} s")

    signal.signal(signal.SIGALRM, fire)
    # Everything any case may load is loaded first, so the baseline is the
    # process as a worker holds it, and no case is charged for imports.
    import bz2  # noqa: F401
    import gzip  # noqa: F401
    import lzma  # noqa: F401
    import tarfile  # noqa: F401
    from xml.etree import ElementTree  # noqa: F401

    import numpy  # noqa: F401
    import zstandard  # noqa: F401

    import diskpipe.converter.convert
    import diskpipe.jobs.pipeline
    import diskpipe.validation  # noqa: F401

    print(json.dumps({"baseline": peak_rss()}), flush=True)
    for case in request["cases"]:
        reset_peak()
        started = time.monotonic()
        signal.alarm(CASE_SECONDS)
        try:
            outcome = run_case(case, settings)
        except Hang as error:
            outcome = f"hang: {error}"
        except Exception as error:  # noqa: BLE001 - reported to the test, which fails on it
            outcome = f"crash: {type(error).__name__}: {error}\n{traceback.format_exc(limit=4)}"
        finally:
            signal.alarm(0)
        result = {
            "name": case["name"],
            "action": case["action"],
            "peak": peak_rss(),
            "seconds": round(time.monotonic() - started, 2),
            "outcome": outcome,
        }
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
