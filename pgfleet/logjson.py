"""daemon.log as JSON lines (`pgfleet up --log-format json`): one object per record, with an
event's fields (pgfleet.fleet.events) under `event`."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        at = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
        out = {"at": at.replace("+00:00", "Z"), "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage()}
        event = getattr(record, "event", None)
        if event is not None:
            out["event"] = event
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def formatter(kind: str) -> logging.Formatter:
    if kind not in LOG_FORMATS:
        raise ValueError(f"unknown log format {kind!r}: choose one of {', '.join(LOG_FORMATS)}")
    return JsonFormatter() if kind == "json" else logging.Formatter(TEXT_FORMAT)
