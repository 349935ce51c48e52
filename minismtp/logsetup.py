"""Log set-up for the server: one stream, and a level a reload can change.

Untrusted input: none (the validated logging.level).
"""

from __future__ import annotations

import logging
import sys

# Every line of the server's log, the per-message lines of msglog.py included.
LOG_FORMAT = "%(asctime)s minismtp[%(process)d] %(levelname)s %(message)s"


def setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, format=LOG_FORMAT)
    apply_level(level)


def apply_level(level: str) -> None:
    """Set `level` (debug, info, warning, error) in this process; workers forked later
    inherit it."""
    numeric = getattr(logging, level.upper())
    logging.getLogger().setLevel(numeric)
    # The master's few lines (addresses, reloads, stops, summary) are always wanted:
    # a quiet log level is for the per-message lines.
    logging.getLogger("minismtp.master").setLevel(min(numeric, logging.INFO))
