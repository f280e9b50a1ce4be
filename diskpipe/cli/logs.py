"""Logging for one `diskpipe` run, as parser.logging_choice says: the
root logger at the chosen level, lines as text or as one JSON object each
(--log-format json, for log shippers).

Imported only when a run sets up logging: `diskpipe info` and `validate`
log nothing of their own, and without a logging option they do not load
the logging package at all (it costs their start-up milliseconds);
Python's last-resort handler still prints a warning.
"""

from __future__ import annotations

import logging
import sys

TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"


def configure(level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        from diskpipe.cli.jsonlog import JsonLines

        handler.setFormatter(JsonLines())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
