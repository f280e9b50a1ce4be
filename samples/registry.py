"""Which modules contribute recipes, in manifest order.

To add a family of samples, write a module with a module-level `RECIPES`
list of `Recipe`s and name it here, or (for `samples.hostile`) just create
the file: optional modules are picked up when they exist.
"""

from __future__ import annotations

import importlib

from samples.recipe import Recipe

BUILDER_MODULES = (
    "samples.raw",
    "samples.qcow",
    "samples.vmdk",
    "samples.vhd",
    "samples.qemu",
    "samples.crypto",
    "samples.iso",
    "samples.partitions",
    "samples.kernel",
    "samples.ramdisk",
    "samples.filesystems",
    "samples.nondisk",
    "samples.handmade",
)
OPTIONAL_MODULES = ("samples.hostile",)


def all_recipes() -> list[Recipe]:
    recipes: list[Recipe] = []
    for name in BUILDER_MODULES + OPTIONAL_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if name in OPTIONAL_MODULES and error.name == name:
                continue
            raise
        recipes.extend(module.RECIPES)
    names = [recipe.name for recipe in recipes]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"duplicate recipe names: {', '.join(duplicates)}")
    return recipes
