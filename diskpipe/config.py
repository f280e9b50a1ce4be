"""diskpipe's one configuration file, and environment overrides.

The file is TOML with one section per part (`[policy]`, `[store]`, `[rbd]`,
`[celery]`, `[import]`). Its path comes from `DISKPIPE_CONFIG`; without it,
`/etc/diskpipe/diskpipe.toml` is read when it exists. A single key is
overridden by `DISKPIPE_<SECTION>_<KEY>` (e.g. `DISKPIPE_POLICY_MAX_VIRTUAL_SIZE=1T`);
the command line overrides both.

Each section is a frozen dataclass (or a NamedTuple on the fast `info` path)
marked with `@section("name")`; `load(SectionClass)` is the one loader: it
reads the file's table, then the environment, then the command line's
overrides, and converts each value by the field's type (sizes accept K/M/G/T
suffixes, lists accept comma-separated text in the environment). A value that
does not fit is refused with its key, where it came from (file or variable)
and an example of a valid value; sizes, counts and durations are never
negative or infinite. A `DISKPIPE_<SECTION>_<KEY>` variable whose key the
section lacks (a typo) is warned about once.

Kept hand-written rather than pydantic-settings: these ~150 lines cover every
section, and importing pydantic would add tens of milliseconds to every
`diskpipe info` (the CLI's start-up is measured in benchmarks/inspect_speed.py).
"""

from __future__ import annotations

import os

# This module loads with the policy on every `diskpipe info`: typing, types,
# math and collections.abc are imported where a value is converted, and the
# common case (no file, no variables, no overrides) converts nothing.
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see diskpipe/formats/tuples.py)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, TypeVar

    Section = TypeVar("Section")

DEFAULT_CONFIG_PATH = "/etc/diskpipe/diskpipe.toml"
ENV_PREFIX = "DISKPIPE_"
_SIZE_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


class ConfigError(ValueError):
    """The configuration file or an override is not valid (a setup mistake)."""


def section(name: str) -> Any:
    """Class decorator: the config file table (`[name]`) the class is read from."""

    def mark(cls: type[Section]) -> type[Section]:
        cls.__config_section__ = name  # type: ignore[attr-defined]
        return cls

    return mark


def parse_size(value: str | int) -> int:
    """`2T`, `512M`, `4096`, `1.5G`, `64KiB` -> bytes; never negative."""
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"not a size: {value!r}")
        return value
    text = value.strip().upper().removesuffix("IB").removesuffix("B")
    number, suffix = (text[:-1], text[-1]) if text and text[-1] in _SIZE_SUFFIXES else (text, "")
    try:
        size = float(number) * _SIZE_SUFFIXES[suffix]
    except ValueError as error:
        raise ConfigError(f"not a size: {value!r}") from error
    import math

    if not math.isfinite(size) or size < 0:
        raise ConfigError(f"not a size: {value!r}")
    return int(size)


def config_path() -> str | None:
    explicit = os.environ.get("DISKPIPE_CONFIG")
    if explicit:
        return explicit
    return DEFAULT_CONFIG_PATH if os.path.exists(DEFAULT_CONFIG_PATH) else None


_parsed: dict[tuple[str, tuple[int, int]], dict[str, Any]] = {}


def _read_file(path: str, version: tuple[int, int]) -> dict[str, Any]:
    """Parsed once per (path, mtime and size): an edited file is read anew."""
    known = _parsed.get((path, version))
    if known is not None:
        return known
    import tomllib

    try:
        with open(path, "rb") as handle:
            parsed = tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: {error}") from error
    except OSError as error:
        raise ConfigError(f"{path}: {error.strerror}") from error
    _parsed[(path, version)] = parsed
    return parsed


def load_file(path: str | None = None) -> dict[str, Any]:
    path = path or config_path()
    if not path:
        return {}
    try:
        status = os.stat(path)
    except OSError as error:
        raise ConfigError(f"{path}: {error.strerror}") from error
    return dict(_read_file(path, (status.st_mtime_ns, status.st_size)))


_EXAMPLES = {
    bool: "true or false",
    int: "a whole number, not negative: 30, 4096 (sizes also 512M, 2T)",
    float: "a number of seconds or a rate: 30, 1.5",
    str: 'a string in quotes: "text"',
}


def _example(annotation: Any) -> str:
    import typing

    origin = typing.get_origin(annotation)
    if origin in (frozenset, tuple, list):
        return 'a list: ["a", "b"] in the file, a,b in an environment variable'
    return _EXAMPLES.get(annotation, str(annotation))


def _non_negative(number: float, value: Any) -> float:
    import math

    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{value!r} is negative or not finite")
    return number


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
    raise ValueError(value)


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ConfigError as error:  # said again by _convert, with the key and its origin
            raise ValueError(value) from error
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    if not isinstance(value, (int, float)):
        raise ValueError(value)
    return int(_non_negative(value, value))


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(value)
    return _non_negative(float(value), value)


def _to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(value)
    return value


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def _convert(where: str, value: Any, annotation: Any) -> Any:
    """Convert a file or environment value to the field's declared type."""
    import types
    import typing

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        annotation = next(arg for arg in args if arg is not type(None))
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    try:
        scalar = _SCALARS.get(annotation)
        if scalar is not None:
            return scalar(value)
        if origin in (frozenset, tuple, list):
            if isinstance(value, str):
                items: list[Any] = [item.strip() for item in value.split(",") if item.strip()]
            elif isinstance(value, (list, tuple)):
                items = list(value)
            else:
                raise ValueError(value)
            item_type = args[0] if args else str
            converted = [_convert(where, item, item_type) for item in items]
            return frozenset(converted) if origin is frozenset else tuple(converted)
    except ConfigError:
        raise
    except (ValueError, TypeError, OverflowError) as error:
        raise ConfigError(f"{where}: cannot use {value!r}; expected {_example(annotation)}") from error
    return value


def load(cls: type[Section], path: str | None = None, **overrides: Any) -> Section:
    """Section `cls` (marked with `@section`) from the configuration file
    (`path`, else DISKPIPE_CONFIG or the default), then `DISKPIPE_SECTION_KEY`
    environment variables, then explicit (command line) overrides."""
    name: str = cls.__config_section__  # type: ignore[attr-defined]
    path = path or config_path()
    table = load_file(path).get(name, {})
    return load_section(cls, name, table, source=path or "the configuration", **overrides)


def load_section(
    cls: type[Section],
    name: str,
    file_values: Mapping[str, Any] | None = None,
    *,
    source: str = "the configuration",
    **overrides: Any,
) -> Section:
    """Build section `cls` from `file_values` (the file's `[name]` table),
    the environment and the overrides; `load` is the usual way in."""
    if file_values is None:
        file_values = load_file().get(name, {})
    if not isinstance(file_values, dict):  # TOML's tables are; collections.abc loads for other mappings only
        from collections.abc import Mapping

        if not isinstance(file_values, Mapping):
            raise ConfigError(f"{source}: [{name}] must be a table: a line [{name}], then key = value lines")
    hints: dict[str, Any] | None = None  # the fields' types, looked up when a value needs one
    fields = _field_names(cls)
    unknown = set(file_values) - fields
    if unknown:
        raise ConfigError(f"{source}: [{name}] {_unknown_keys(sorted(unknown), fields)}")
    _warn_unknown_variables(name, fields)
    values: dict[str, Any] = {}
    for field_name in fields:
        raw: Any = file_values.get(field_name, _MISSING)
        where = f"{source}: [{name}] {field_name}"
        variable = f"{ENV_PREFIX}{name.upper()}_{field_name.upper()}"
        env_value = os.environ.get(variable)
        if env_value is not None:
            raw, where = env_value, f"environment variable {variable}"
        if field_name in overrides and overrides[field_name] is not None:
            raw, where = overrides[field_name], f"option for {name}.{field_name}"
        if raw is not _MISSING:
            if hints is None:
                import typing

                hints = typing.get_type_hints(cls)
            values[field_name] = _convert(where, raw, hints[field_name])
    return cls(**values)


def _unknown_keys(unknown: list[str], fields: set[str]) -> str:
    """Which keys are unknown, the known key each one most likely meant, and
    the known keys."""
    import difflib  # only on this error: off the `info` path

    named = []
    for key in unknown:
        close = difflib.get_close_matches(key, fields, n=1)
        named.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    return f"has unknown key{'s' if len(unknown) > 1 else ''} {', '.join(named)}; known: {', '.join(sorted(fields))}"


_MISSING = object()
_warned: set[str] = set()


def _warn_unknown_variables(name: str, fields: set[str]) -> None:
    """A `DISKPIPE_<SECTION>_<KEY>` variable naming no key of the section is
    most likely a typo that would otherwise be ignored in silence."""
    prefix = f"{ENV_PREFIX}{name.upper()}_"
    known = {prefix + field.upper() for field in fields}
    for variable in os.environ:
        if variable.startswith(prefix) and variable not in known and variable not in _warned:
            _warned.add(variable)
            import logging  # only when there is something to say: off the info path

            logging.getLogger("diskpipe.config").warning(
                "environment variable %s is not a setting of [%s] (ignored); known: %s",
                variable,
                name,
                ", ".join(sorted(fields)),
            )


def _field_names(cls: type[Any]) -> set[str]:
    """A section is a NamedTuple (kept off dataclasses on the fast CLI path)
    or a dataclass."""
    if hasattr(cls, "_fields"):
        return set(cls._fields)
    import dataclasses

    return {field.name for field in dataclasses.fields(cls)}
