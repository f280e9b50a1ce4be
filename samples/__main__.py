"""`python -m samples OUTDIR [--only GLOB] [--quick]`: write the sample images
and OUTDIR/manifest.json."""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import time
from pathlib import Path

from samples import verdicts
from samples.manifest import write_manifest
from samples.recipe import Recipe
from samples.registry import all_recipes
from samples.runner import build


def _select(recipes: list[Recipe], patterns: list[str], quick: bool) -> list[Recipe]:
    chosen = [r for r in recipes if not quick or r.quick]
    if patterns:
        chosen = [r for r in chosen if any(fnmatch.fnmatchcase(r.name, p) for p in patterns)]
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m samples", description=__doc__)
    parser.add_argument("outdir", type=Path, nargs="?", help="where to write the images and manifest.json")
    parser.add_argument(
        "--only", action="append", default=[], metavar="GLOB", help="build only matching sample names (repeatable)"
    )
    parser.add_argument("--quick", action="store_true", help="a small subset, one or two per format")
    parser.add_argument("--jobs", "-j", type=int, default=max(2, (os.cpu_count() or 1) * 2), help="parallel builders")
    parser.add_argument("--list", action="store_true", help="print the sample names and exit")
    parser.add_argument("--verbose", "-v", action="store_true", help="print each sample's build time and tracebacks")
    args = parser.parse_args(argv)

    # Tools and libraries (pycdlib's dates, mkfs timestamps) use local time;
    # a fixed zone keeps the bytes the same on every machine.
    os.environ["TZ"] = "UTC"
    time.tzset()

    recipes = _select(all_recipes(), args.only, args.quick)
    if args.list:
        print("\n".join(recipe.name for recipe in recipes))
        return 0
    if args.outdir is None:
        parser.error("OUTDIR is required")
    if not recipes:
        parser.error("no sample matches")

    started = time.monotonic()
    outcome = build(recipes, args.outdir, args.jobs, args.verbose)
    manifest = write_manifest(args.outdir, verdicts.apply(outcome.samples))
    for name, reason in outcome.skipped.items():
        print(f"skipped {name}: {reason}", file=sys.stderr)
    for name, reason in outcome.failed.items():
        print(f"FAILED {name}: {reason}", file=sys.stderr)
    print(
        f"{len(outcome.samples)} samples in {time.monotonic() - started:.1f}s -> {manifest}"
        f" ({len(outcome.skipped)} skipped, {len(outcome.failed)} failed)",
        file=sys.stderr,
    )
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
