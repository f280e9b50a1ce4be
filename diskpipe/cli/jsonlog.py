"""`--log-format json`: one JSON object per log record, on one line."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any


class JsonLines(logging.Formatter):
    """time (UTC, ISO 8601), level, logger, message, process, and the
    traceback as `exception`. json.dumps escapes a message's or traceback's
    newlines, so a record is always one line. Written here rather than
    taken from python-json-logger: these few lines are all the format needs,
    and a shipper wants no more keys than these."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document)
