"""diskpipe's one configuration file, and environment overrides.

The file is TOML with one section per part (`[policy]`, `[store]`, `[rbd]`,
`[celery]`, `[import]`). Its path comes from `DISKPIPE_CONFIG`; without it,
`/etc/diskpipe/diskpipe.toml` is read when it exists. A single key is
overridden by `DISKPIPE_<SECTION>_<KEY>` (e.g. `DISKPIPE_POLICY_MAX_VIRTUAL_SIZE=1T`);
the command line overrides both.

Each section is a frozen dataclass; `load_section` builds one from the file
and the environment, converting values by the field's type (sizes accept
K/M/G/T suffixes, lists accept comma-separated text in the environment).
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any, TypeVar

DEFAULT_CONFIG_PATH = "/etc/diskpipe/diskpipe.toml"
ENV_PREFIX = "DISKPIPE_"
_SIZE_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}

Section = TypeVar("Section")


class ConfigError(ValueError):
    """The configuration file or an override is not valid."""


def parse_size(value: str | int) -> int:
    """`2T`, `512M`, `4096`, `1.5G`, `64KiB` -> bytes."""
    if isinstance(value, int):
        return value
    text = value.strip().upper().removesuffix("IB").removesuffix("B")
    number, suffix = (text[:-1], text[-1]) if text and text[-1] in _SIZE_SUFFIXES else (text, "")
    try:
        return int(float(number) * _SIZE_SUFFIXES[suffix])
    except ValueError as error:
        raise ConfigError(f"not a size: {value!r}") from error


def config_path() -> str | None:
    explicit = os.environ.get("DISKPIPE_CONFIG")
    if explicit:
        return explicit
    return DEFAULT_CONFIG_PATH if os.path.exists(DEFAULT_CONFIG_PATH) else None


@cache
def _read_file(path: str, version: tuple[int, int]) -> dict[str, Any]:
    """Parsed once per (path, mtime and size): an edited file is read anew."""
    import tomllib

    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: {error}") from error
    except OSError as error:
        raise ConfigError(f"{path}: {error.strerror}") from error


def load_file(path: str | None = None) -> dict[str, Any]:
    path = path or config_path()
    if not path:
        return {}
    try:
        status = os.stat(path)
    except OSError as error:
        raise ConfigError(f"{path}: {error.strerror}") from error
    return dict(_read_file(path, (status.st_mtime_ns, status.st_size)))


def _convert(name: str, value: Any, annotation: Any) -> Any:
    """Convert a file or environment value to the field's declared type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        annotation = next(arg for arg in args if arg is not type(None))
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    try:
        if annotation is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if annotation is int:
            return parse_size(value) if isinstance(value, str) else int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            return str(value)
        if origin in (frozenset, tuple, list):
            items = (
                [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else list(value)
            )
            item_type = args[0] if args else str
            converted = [_convert(name, item, item_type) for item in items]
            return frozenset(converted) if origin is frozenset else tuple(converted)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{name}: cannot read {value!r} as {annotation}") from error
    return value


def load_section(
    cls: type[Section], name: str, file_values: Mapping[str, Any] | None = None, **overrides: Any
) -> Section:
    """Build section `cls` from the file's `[name]` table, then `DISKPIPE_NAME_KEY`
    environment variables, then explicit (command line) overrides."""
    if file_values is None:
        file_values = load_file().get(name, {})
    if not isinstance(file_values, Mapping):
        raise ConfigError(f"[{name}] must be a table")
    hints = typing.get_type_hints(cls)
    fields = _field_names(cls)
    unknown = set(file_values) - fields
    if unknown:
        raise ConfigError(f"[{name}]: unknown keys {sorted(unknown)}")
    values: dict[str, Any] = {}
    for field_name in fields:
        raw: Any = file_values.get(field_name, _MISSING)
        env_value = os.environ.get(f"{ENV_PREFIX}{name.upper()}_{field_name.upper()}")
        if env_value is not None:
            raw = env_value
        if field_name in overrides and overrides[field_name] is not None:
            raw = overrides[field_name]
        if raw is not _MISSING:
            values[field_name] = _convert(f"{name}.{field_name}", raw, hints[field_name])
    return cls(**values)


_MISSING = object()


def _field_names(cls: type[Any]) -> set[str]:
    """A section is a NamedTuple (kept off dataclasses on the fast CLI path)
    or a dataclass."""
    if hasattr(cls, "_fields"):
        return set(cls._fields)
    import dataclasses

    return {field.name for field in dataclasses.fields(cls)}
