"""Which logging a run asked for: the options (`--debug`, `-v`,
`--log-level`, `--log-format`, parser.add_logging_options) and the
DISKPIPE_LOG_LEVEL / DISKPIPE_LOG_FORMAT variables.

Apart from the parser so that `diskpipe info`'s short path (diskpipe/cli/fast.py)
decides the same way without importing argparse.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see diskpipe/formats/tuples.py)
if TYPE_CHECKING:
    import argparse

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
LEVEL_VARIABLE = "DISKPIPE_LOG_LEVEL"
FORMAT_VARIABLE = "DISKPIPE_LOG_FORMAT"


class LoggingSetupError(ValueError):
    """A logging environment variable names no level or format (exit 2)."""


def logging_choice(args: argparse.Namespace) -> tuple[str, str, bool]:
    """(level, format, asked) for this run; `asked` is False when no option
    and no environment variable said anything about logging."""
    level = getattr(args, "log_level", None) or _from_environment(LEVEL_VARIABLE, LOG_LEVELS)
    log_format = getattr(args, "log_format", None) or _from_environment(FORMAT_VARIABLE, LOG_FORMATS)
    verbose = getattr(args, "verbose", 0) + getattr(args, "verbose_after", 0)
    debug = bool(getattr(args, "debug", False))
    asked = bool(level or log_format or verbose or debug)
    if level is None:
        level = "DEBUG" if debug or verbose >= 2 else "INFO" if verbose == 1 else "WARNING"
    return level, log_format or "text", asked


def _from_environment(variable: str, allowed: tuple[str, ...]) -> str | None:
    value = os.environ.get(variable, "").strip()
    if not value:
        return None
    matching = [choice for choice in allowed if choice.lower() == value.lower()]
    if not matching:
        raise LoggingSetupError(f"environment variable {variable}: {value!r} is not one of {', '.join(allowed)}")
    return matching[0]
