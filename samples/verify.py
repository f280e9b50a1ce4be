"""`python -m samples.verify OUTDIR`: check the manifest against qemu-img and diskpipe.

For every sample: qemu-img info -f FORMAT must report the manifest's
virtual size (when `qemu_oracle`), qemu-img map must sum to `allocated`
(when set), and diskpipe's `inspect` must agree on format, disk_format,
virtual size, content kinds and allocated size. A qemu mismatch is a bug in
the generator; a diskpipe mismatch is a finding for diskpipe.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samples import tools
from samples.manifest import Sample, load_manifest


@dataclass(frozen=True, slots=True)
class Issue:
    sample: str
    source: str  # "qemu" (generator wrong) or "diskpipe" (inspector disagrees)
    field: str
    expected: Any
    got: Any

    def __str__(self) -> str:
        return f"{self.source:8} {self.sample:36} {self.field:13} manifest={self.expected!r} {self.source}={self.got!r}"


def check_qemu(sample: Sample, path: Path) -> list[Issue]:
    issues: list[Issue] = []
    if sample.qemu_oracle:
        try:
            info = tools.info(path, sample.format)
        except RuntimeError as error:
            return [Issue(sample.name, "qemu", "open", "opens", str(error))]
        if info.get("virtual-size") != sample.virtual_size:
            issues.append(Issue(sample.name, "qemu", "virtual_size", sample.virtual_size, info.get("virtual-size")))
        if info.get("format") != sample.format:
            issues.append(Issue(sample.name, "qemu", "format", sample.format, info.get("format")))
    if sample.allocated is not None:
        try:
            mapped = tools.mapped_data(path, sample.format)
        except RuntimeError as error:
            return [*issues, Issue(sample.name, "qemu", "map", "maps", str(error))]
        if mapped != sample.allocated:
            issues.append(Issue(sample.name, "qemu", "allocated", sample.allocated, mapped))
    return issues


def check_diskpipe(sample: Sample, path: Path) -> list[Issue]:
    from diskpipe.formats import inspect  # the package under test, imported only when asked

    try:
        info = inspect(path, allocation=sample.allocated is not None)
    except Exception as error:  # noqa: BLE001 - any failure is a finding to report
        return [Issue(sample.name, "diskpipe", "inspect", "succeeds", f"{type(error).__name__}: {error}")]
    issues: list[Issue] = []
    for name, expected, got in (
        ("format", sample.format, info.format),
        ("disk_format", sample.disk_format, info.disk_format),
        ("virtual_size", sample.virtual_size, info.virtual_size),
        ("contents", sorted(sample.contents), sorted(info.content_kinds())),
    ):
        if expected != got:
            issues.append(Issue(sample.name, "diskpipe", name, expected, got))
    # diskpipe counts allocation from maps inside the image; a text descriptor's
    # extents are other files and a fixed VHD has no map (qemu calls it all data).
    has_map = not (info.details.get("text-descriptor") or (info.format == "vpc" and info.subformat == "fixed"))
    if sample.allocated is not None and has_map and info.allocated_size != sample.allocated:
        issues.append(Issue(sample.name, "diskpipe", "allocated", sample.allocated, info.allocated_size))
    return issues


def verify(outdir: Path, patterns: list[str], with_diskpipe: bool) -> list[Issue]:
    samples = [
        s for s in load_manifest(outdir) if not patterns or any(fnmatch.fnmatchcase(s.name, p) for p in patterns)
    ]

    def check(sample: Sample) -> list[Issue]:
        path = sample.path(outdir)
        if not path.exists():
            return [Issue(sample.name, "file", "exists", True, False)]
        issues = check_qemu(sample, path)
        if with_diskpipe:
            issues += check_diskpipe(sample, path)
        return issues

    with ThreadPoolExecutor(max_workers=4) as pool:
        return [issue for issues in pool.map(check, samples) for issue in issues]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m samples.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--only", action="append", default=[], metavar="GLOB")
    parser.add_argument("--qemu-only", action="store_true", help="do not run diskpipe")
    args = parser.parse_args(argv)
    issues = verify(args.outdir, args.only, with_diskpipe=not args.qemu_only)
    for issue in issues:
        print(issue)
    sys.stdout.flush()
    count = len(load_manifest(args.outdir))
    print(f"{count} samples, {len(issues)} disagreements", file=sys.stderr)
    return 1 if issues else 0


if __name__ == "__main__":
    sys.exit(main())
