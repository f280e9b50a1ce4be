"""`typing.NamedTuple`'s class syntax, without importing typing.

Importing typing pulls in re, enum, functools and contextlib: about ten
milliseconds of every `diskpipe info` start, more than the inspection
itself. The modules on that path declare their records as

    TYPE_CHECKING = False
    if TYPE_CHECKING:
        from typing import NamedTuple
    else:
        from diskpipe.formats.tuples import NamedTuple

so mypy checks them as real NamedTuples, and at run time this class
builds the same `collections.namedtuple` that typing would: same fields,
defaults, methods, docstring, pickling. Field annotations are kept as they
are written (strings under `from __future__ import annotations`) and never
evaluated, which also spares typing's per-field checks.
"""

from __future__ import annotations

from collections import namedtuple

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# What the class statement puts in a namespace that is not the record's own.
_NAMESPACE_ONLY = frozenset({"__module__", "__qualname__", "__annotations__", "__doc__", "__orig_bases__"})
# namedtuple's own attributes, which a record must not redefine.
_RESERVED = frozenset({"__new__", "__init__", "__slots__", "__getnewargs__", "_fields", "_field_defaults", "_make", "_replace", "_asdict", "_source"})  # fmt: skip


class _RecordMaker(type):
    """Turns `class Name(NamedTuple): field: type = default ...` into a namedtuple."""

    def __new__(mcls, name: str, bases: tuple[type, ...], namespace: dict[str, Any]) -> type:
        if not bases:  # NamedTuple itself
            return super().__new__(mcls, name, bases, namespace)
        if "__classcell__" in namespace:
            raise TypeError(f"{name}: super() and __class__ are not supported in a NamedTuple's methods")
        annotations = dict(namespace.get("__annotations__", {}))
        defaults = []
        for field in annotations:
            if field in namespace:
                defaults.append(namespace[field])
            elif defaults:
                raise TypeError(f"{name}: non-default field {field!r} follows a field with a default")
        record = namedtuple(name, list(annotations), defaults=defaults, module=namespace["__module__"])  # type: ignore[misc]
        record.__qualname__ = namespace.get("__qualname__", name)
        record.__annotations__ = annotations
        if namespace.get("__doc__") is not None:
            record.__doc__ = namespace["__doc__"]
        for key, value in namespace.items():
            if key in annotations or key in _NAMESPACE_ONLY:
                continue
            if key in _RESERVED:
                raise AttributeError(f"{name}: cannot overwrite NamedTuple attribute {key}")
            setattr(record, key, value)
        return record


class NamedTuple(metaclass=_RecordMaker):
    """Base of the class syntax; the classes made are plain namedtuples."""
