"""Logging for one `diskpipe` run: the level from --log-level, -v or
--debug, and lines as text or as one JSON object each (--log-format json,
for log shippers).

`diskpipe info` and `validate` log nothing of their own: when no option
asks for logging, they do not import the logging package at all (it costs
their start-up several milliseconds); Python's last-resort handler still
prints a warning.
"""

from __future__ import annotations

import argparse
import os

from diskpipe.cli.parser import LOG_FORMATS, LOG_LEVELS

LEVEL_VARIABLE = "DISKPIPE_LOG_LEVEL"
FORMAT_VARIABLE = "DISKPIPE_LOG_FORMAT"
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"


class LoggingOptionError(ValueError):
    """An environment variable names no level or format (a setup mistake)."""


def choice(args: argparse.Namespace) -> tuple[str, str, bool]:
    """(level, format, asked): `asked` is False when neither an option nor
    an environment variable said anything about logging."""
    level = getattr(args, "log_level", None) or _from_environment(LEVEL_VARIABLE, LOG_LEVELS, upper=True)
    log_format = getattr(args, "log_format", None) or _from_environment(FORMAT_VARIABLE, LOG_FORMATS, upper=False)
    verbose = getattr(args, "verbose", 0) + getattr(args, "verbose_after", 0)
    debug = bool(getattr(args, "debug", False))
    asked = bool(level or log_format or verbose or debug)
    if level is None:
        level = "DEBUG" if debug or verbose >= 2 else "INFO" if verbose == 1 else "WARNING"
    return level, log_format or "text", asked


def _from_environment(variable: str, allowed: tuple[str, ...], *, upper: bool) -> str | None:
    value = os.environ.get(variable, "").strip()
    if not value:
        return None
    value = value.upper() if upper else value.lower()
    if value not in allowed:
        raise LoggingOptionError(f"environment variable {variable}: {value!r} is not one of {', '.join(allowed)}")
    return value


def configure(args: argparse.Namespace, *, always: bool) -> None:
    """Set up the root logger for this run; without `always` only when asked."""
    level, log_format, asked = choice(args)
    if not (asked or always):
        return
    import logging
    import sys

    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        from diskpipe.cli.jsonlog import JsonLines

        handler.setFormatter(JsonLines())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
