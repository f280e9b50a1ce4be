"""Builds a list of recipes in parallel; each gets its own scratch directory.

Threads are enough: the recipes mostly wait for qemu-img, mkfs and friends.
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from samples.manifest import Sample
from samples.recipe import Context, Recipe, Skip


@dataclass(slots=True)
class Outcome:
    samples: list[Sample] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def _build_one(recipe: Recipe, outdir: Path, scratch_root: Path, verbose: bool) -> Sample | Skip | Exception:
    scratch = Path(tempfile.mkdtemp(prefix=f"{recipe.name}.", dir=scratch_root))
    started = time.monotonic()
    try:
        sample = recipe.build(Context(outdir=outdir, scratch=scratch))
    except Skip as skip:
        return skip
    except Exception as error:  # noqa: BLE001 - one broken recipe must not stop the others
        if verbose:
            traceback.print_exc()
        return error
    if sample.name != recipe.name:
        return ValueError(f"recipe {recipe.name} returned sample {sample.name}")
    if verbose:
        sys.stderr.write(f"  {time.monotonic() - started:6.2f}s {recipe.name}\n")  # one write: threads interleave
    return sample


def build(recipes: list[Recipe], outdir: Path, jobs: int, verbose: bool = False) -> Outcome:
    outdir.mkdir(parents=True, exist_ok=True)
    outcome = Outcome()
    with (
        tempfile.TemporaryDirectory(prefix="diskpipe-samples.") as scratch_root,
        ThreadPoolExecutor(max_workers=max(1, jobs)) as pool,
    ):
        results = list(pool.map(lambda r: _build_one(r, outdir, Path(scratch_root), verbose), recipes))
    for recipe, result in zip(recipes, results, strict=True):
        if isinstance(result, Sample):
            outcome.samples.append(result)
        elif isinstance(result, Skip):
            outcome.skipped[recipe.name] = str(result)
        else:
            outcome.failed[recipe.name] = f"{type(result).__name__}: {result}"
    return outcome
