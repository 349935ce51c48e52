"""Log set-up for the server: one stream, a level and a format a reload can change.

Untrusted input: none here (the validated logging settings); what records carry is
escaped by the formatters (JSON) or was made printable where it came from.

Two formats (`logging.format`): `text`, one line per record in LOG_FORMAT, and `json`,
one JSON object per line, for log shippers. The per-message and per-session lines of
msglog.py follow the same choice.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from minismtp.logstream import LogHandler, LogStream

# Every line of the server's log, the per-message lines of msglog.py included.
LOG_FORMAT = "%(asctime)s minismtp[%(process)d] %(levelname)s %(message)s"
FORMATS = ("text", "json")


def timestamp(now: float) -> str:
    """ISO 8601 local time with milliseconds and the UTC offset, as JSON lines carry it."""
    local = time.localtime(now)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", local) + f".{int(now % 1 * 1000):03d}"
            + time.strftime("%z", local))


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, pid, level, logger, message (and exc)."""

    def format(self, record: logging.LogRecord) -> str:
        document = {"time": timestamp(record.created), "pid": record.process,
                    "level": record.levelname, "logger": record.name,
                    "message": record.getMessage()}
        if record.exc_info:
            document["exc"] = self.formatException(record.exc_info)
        return json.dumps(document)  # ASCII only: valid JSON in any stream encoding


def setup_logging(level: str, form: str = "text") -> None:
    """One handler on standard error that never waits for its reader (logstream.py)."""
    root = logging.getLogger()
    if not root.handlers:  # as logging.basicConfig: a set-up made before stays
        try:
            handler: logging.Handler = LogHandler(sys.stderr,
                                                  LogStream.open(sys.stderr.fileno()))
        except (AttributeError, OSError, ValueError):  # no descriptor behind sys.stderr
            handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    # Python's warnings (a library's DeprecationWarning, a ResourceWarning) would be
    # written to sys.stderr directly, and block on a stalled reader: they go through the
    # handler instead, as records of the "py.warnings" logger.
    logging.captureWarnings(True)
    apply_level(level)
    apply_format(form)


def apply_format(form: str) -> None:
    """Use `form` ("text" or "json") for every record from now on, in this process and
    in workers forked later."""
    formatter = JsonFormatter() if form == "json" else logging.Formatter(LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)


def apply_level(level: str) -> None:
    """Set `level` (debug, info, warning, error) in this process; workers forked later
    inherit it."""
    numeric = getattr(logging, level.upper())
    logging.getLogger().setLevel(numeric)
    # The master's few lines (addresses, reloads, stops, summary) are always wanted:
    # a quiet log level is for the per-message lines.
    logging.getLogger("minismtp.master").setLevel(min(numeric, logging.INFO))
