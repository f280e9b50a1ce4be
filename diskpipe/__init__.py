"""diskpipe: find out what an uploaded disk image really is, refuse the
dangerous ones, convert the rest to raw and store them in Ceph RBD.

The validation hook is importable from here without Celery or Ceph:
`diskpipe.validate(path_or_file, claimed=None, policy=None) -> Verdict` and
`diskpipe.ValidatingReader(upload, claimed=None, policy=None)`. Names load on
first use, so `import diskpipe` itself costs nothing.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see diskpipe/formats/tuples.py)
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "validate": "diskpipe.validation",
    "ValidatingReader": "diskpipe.validation",
    "UnsafeImage": "diskpipe.refusal",
    "FormatError": "diskpipe.formats.errors",
    "inspect": "diskpipe.formats.api",
    "StreamInspector": "diskpipe.formats.api",
    "ImageInfo": "diskpipe.formats.info",
    "Policy": "diskpipe.formats.policy",
    "Verdict": "diskpipe.formats.policy",
    "Issue": "diskpipe.formats.policy",
    "load_policy": "diskpipe.formats.policy",
}
__all__ = list(_EXPORTS)  # names load lazily through __getattr__


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'diskpipe' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)
