"""Stores by kind: the one place that knows which stores exist.

The command line (`--store KIND:ARGUMENT`), the worker and the config
(`[store] kind`) all build their store here. Each store reads its own
config section (`[rbd]`, `[s3]`); the argument overrides its main setting
(the file store's directory, the RBD pool, the S3 bucket). Adding a store is
one entry below and its module.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from diskpipe.config import section

if TYPE_CHECKING:  # kept light: the CLI reads the kinds while building its parser
    from diskpipe.converter.stores.base import Store


class UnknownStore(ValueError):
    """No store of that kind, or a malformed `--store` value: a usage error."""


def _data_home() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "diskpipe")


@section("store")
@dataclass(frozen=True, slots=True)
class StoreConfig:
    """The `[store]` section: where images and (embedded) records go."""

    kind: str = "file"  # file | rbd | s3 (each reads its own section: [rbd], [s3])
    directory: str = os.path.join(_data_home(), "images")
    records: str = os.path.join(_data_home(), "records.sqlite")


@dataclass(frozen=True, slots=True)
class StoreKind:
    kind: str
    usage: str  # how `--store` names it
    # (argument or None, the `[store] directory`, the config file or None) -> store
    build: Callable[[str | None, str, str | None], Store]


def _file(argument: str | None, directory: str, config_path: str | None) -> Store:
    from diskpipe.converter.stores.file import FileStore

    return FileStore(argument or directory)


def _rbd(argument: str | None, directory: str, config_path: str | None) -> Store:
    from diskpipe.config import load
    from diskpipe.converter.stores.rbd import RbdConfig, RbdStore

    return RbdStore(load(RbdConfig, config_path, pool=argument or None))


def _s3(argument: str | None, directory: str, config_path: str | None) -> Store:
    from diskpipe.config import load
    from diskpipe.converter.stores.s3 import S3Config, S3Store

    return S3Store(load(S3Config, config_path, bucket=argument or None))


KINDS: dict[str, StoreKind] = {
    kind.kind: kind
    for kind in (
        StoreKind("file", "file:DIR", _file),
        StoreKind("rbd", "rbd:POOL", _rbd),
        StoreKind("s3", "s3:BUCKET", _s3),
    )
}


def usage() -> str:
    return "|".join(kind.usage for kind in KINDS.values())


def parse_spec(value: str) -> tuple[str, str | None]:
    """`KIND[:ARGUMENT]` from the command line -> (kind, argument or None)."""
    kind, _, argument = value.partition(":")
    if kind not in KINDS:
        raise UnknownStore(f"--store takes {usage()}, not {value!r}")
    return kind, argument or None


def create(kind: str, argument: str | None = None, *, directory: str, config_path: str | None = None) -> Store:
    """The store of `kind`, built from its config section."""
    found = KINDS.get(kind)
    if found is None:
        raise UnknownStore(f"unknown store kind {kind!r} ({', '.join(KINDS)})")
    return found.build(argument, directory, config_path)


def make_store(config: StoreConfig, argument: str | None = None) -> Store:
    """The store `[store] kind` names (or `--store`), from its own section."""
    return create(config.kind, argument, directory=config.directory)


def parse_store_option(value: str, base: StoreConfig) -> tuple[StoreConfig, str | None]:
    """`--store KIND[:ARGUMENT]` -> store config and the argument (the file
    store's directory, the RBD pool, the S3 bucket)."""
    kind, argument = parse_spec(value)
    directory = argument if kind == "file" and argument else base.directory
    return StoreConfig(kind=kind, directory=directory, records=base.records), argument
