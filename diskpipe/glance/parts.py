"""The parts of diskpipe the Glance plugin uses, imported in this one place
(public inspection, policy and converter API only), so a move inside
diskpipe changes this file and nothing else in the integration."""

from __future__ import annotations

from diskpipe import __version__
from diskpipe.config import ConfigError, parse_size
from diskpipe.converter.convert import ConversionFailed, ConvertRequest, convert_image, open_source
from diskpipe.converter.qemu_img import CancelToken
from diskpipe.converter.stores.base import Location, StoreError
from diskpipe.converter.stores.file import FileStore, FileTarget
from diskpipe.formats import FormatError, ImageInfo
from diskpipe.formats.api import inspect_fd
from diskpipe.formats.policy import Issue, Policy, Verdict, check, load_policy
from diskpipe.refusal import UnsafeImage, refuse, require_safe

__all__ = [
    "CancelToken",
    "ConfigError",
    "ConversionFailed",
    "ConvertRequest",
    "FileStore",
    "FileTarget",
    "FormatError",
    "ImageInfo",
    "Issue",
    "Location",
    "Policy",
    "StoreError",
    "UnsafeImage",
    "Verdict",
    "__version__",
    "check",
    "convert_image",
    "inspect_fd",
    "load_policy",
    "open_source",
    "parse_size",
    "refuse",
    "require_safe",
]
