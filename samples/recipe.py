"""How a sample is described before it is built: a named `Recipe` whose
`build` callable writes the file(s) under the output directory and returns
the `Sample` record.

Every recipe is independent (it makes its own intermediate files in a
private scratch directory), so `--only` can build any one of them alone and
the runner can build them in parallel in any order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from samples.manifest import Sample


class Skip(Exception):
    """A recipe cannot run here (a tool is missing); the run goes on without it."""


@dataclass(frozen=True, slots=True)
class Context:
    """Where a recipe writes: `outdir` for the sample, `scratch` for the rest."""

    outdir: Path
    scratch: Path

    def out(self, relative: str) -> Path:
        """The output path for `relative`, with its directory created."""
        path = self.outdir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            path.unlink()  # tools such as qemu-img refuse or reuse stale files
        return path

    def tmp(self, name: str) -> Path:
        return self.scratch / name


Build = Callable[[Context], Sample]


@dataclass(frozen=True, slots=True)
class Recipe:
    name: str
    build: Build
    quick: bool = False  # part of the `--quick` subset


class RecipeList(list[Recipe]):
    """A module's recipes, with a decorator to add one-off builders."""

    def add(self, name: str, *, quick: bool = False) -> Callable[[Build], Build]:
        def register(build: Build) -> Build:
            self.append(Recipe(name, build, quick))
            return build

        return register
