"""The per-message and per-session log lines: formatted here, written in batches.

Untrusted input: the envelope sender (printable text, the core admits no other, but a
quoted local part may hold spaces, so the text lines escape them: a sender cannot forge
fields); command verbs (the core counts unknown ones as "unknown", so none is client
text); the user name of an accepted AUTH, which may hold anything, so the text lines
escape it (`printable`). Client text is cut to SHOWN_CHARS characters, so that a line
stays within one atomic write (PIPE_BUF) however long the client made it.

Why not `logging`: each record costs a LogRecord, a Formatter pass, a lock and a write
system call, several microseconds per message (bench/README.md), which at `info` (the
default) cost a quarter of the throughput of short sessions. Here a line is one f-string
with a timestamp cached per second, held in memory, and the lines of many turns go out
in one write.

What is kept: the lines look exactly like the other log records (one LOG_FORMAT), stay in
order with them (a worker's other records first write the held lines out, through a filter
on the root handlers), and each write is at most PIPE_BUF bytes of whole lines, so lines
of several workers sharing one pipe never interleave mid-line.

When: each line goes, as it is made, to the worker's slot in shared memory (logboard.py),
and the slot is written out once its oldest line is HOLD_S old (the loop checks between
turns), when it is full, before any other record of the worker, and on a clean stop.
What a crash costs: nothing made; if the worker dies without writing its slot out
(SIGKILL), its master writes what the slot holds. Without a master (tests, tools) the
slot is the process's own.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

from minismtp.logboard import LogBoard, LogSlot, write_lines
from minismtp.logsetup import LOG_FORMAT, JsonFormatter, timestamp

_COUNTS_KEPT = 256  # rendered command counts of sessions, by their counts
# How long lines may wait in the slot: a reader of the log sees them this late at most,
# and a worker at full speed writes once per few hundred lines instead of once per turn.
HOLD_S = 0.1
_NEVER = float("inf")
_MILLIS = tuple(f",{n:03d}" for n in range(1000))  # a line's timestamp's last field


class MessageLog:
    """One line per message, at level INFO, batched; see the module docstring."""

    __slots__ = ("enabled", "json", "due", "_logger", "_root", "_counts", "_fd", "_encoding",
                 "_slot", "_pid", "_prefix", "_second", "_stamp", "_filter")

    def __init__(self, logger: logging.Logger, root: logging.Logger | None = None,
                 slot: LogSlot | None = None) -> None:
        """`logger` says whether INFO is on; `root` (the root logger) holds the handler
        whose stream the lines go to; `slot`: the worker's, on its master's LogBoard."""
        self.enabled = logger.isEnabledFor(logging.INFO)
        self._logger = logger
        self._root = root = root or logging.getLogger()
        self._counts: dict[tuple[tuple[str, int], ...], str] = {}  # see session()
        self._fd, self._encoding, self.json = _plain_stream(root.handlers)
        self._slot = slot if slot is not None else LogBoard(1).slot(0)
        # When the held lines are to be written out (time.monotonic(), as the loop's
        # clock): HOLD_S after the first of them; never while none are held.
        self.due = _NEVER
        self._pid = os.getpid()
        self._prefix = f" minismtp[{self._pid}] INFO "
        self._second = -1
        self._stamp = ""
        self._filter: _FlushFirst | None = None
        if self.enabled and self._fd is not None:
            self._filter = _FlushFirst(self)
            for handler in root.handlers:
                handler.addFilter(self._filter)

    def message(self, queue_id: str, peer: str, sender: str, recipients: int, size: int,
                tls: str | None, result: str, auth: str | None = None, *,
                listener: str | None = None) -> None:
        """The line of one message's outcome (stored, refused, failed); `auth`: the user
        an accepted AUTH named (never a password), shown as `user=` (the session line's
        `auth=` is the count of AUTH commands); `listener`: the name of the listener the
        session came in on (profiles.py: printable, no spaces)."""
        if self.json:
            fields = {"event": "message", "id": queue_id, "peer": peer,
                      "from": sender, "rcpts": recipients, "size": size, "tls": tls,
                      "result": result}
            self._add_json(fields, listener, auth)
            return
        tls_text = f" tls={tls.split(' (', 1)[0]}" if tls else ""
        user_text = "" if auth is None else f" user={printable(auth)}"
        listener_text = "" if listener is None else f" listener={listener}"
        # Printable already, and within a path's 256 octets (the core's checks): only a
        # quoted local part's spaces or backslashes need escaping, rarely.
        sender_text = sender if " " not in sender and "\\" not in sender else \
            printable(sender, _IN_ADDRESS)
        # As _add() makes a line, but in one piece with its text: this runs for every message.
        milliseconds = time.time_ns() // 1_000_000  # integers: int(float) is a dear call
        second = milliseconds // 1000
        if second != self._second:
            self._new_second(second)
        line = (f"{self._stamp}{_MILLIS[milliseconds % 1000]}{self._prefix}id={queue_id} "
                f"peer={peer}{listener_text} from=<{sender_text}> rcpts={recipients} "
                f"size={size}"
                f"{tls_text}{user_text} result={result}\n")
        self._hold(line)

    def session(self, peer: str, port: int, commands: dict[str, int], errors: int,
                end: str, tls: str | None, auth: str | None = None, *,
                listener: str | None = None) -> None:
        """A session's summary when it closes, in Postfix's style: "disconnect from ...
        listener=mx ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5 end=quit"."""
        if self.json:
            fields = {"event": "disconnect", "peer": peer, "port": port,
                      "commands": commands, "total": sum(commands.values()),
                      "errors": errors, "end": end, "tls": tls}
            self._add_json(fields, listener, auth)
            return
        key = tuple(commands.items())
        counts = self._counts.get(key)
        if counts is None:  # sessions mostly repeat a few shapes: render each once
            if len(self._counts) >= _COUNTS_KEPT:
                self._counts.clear()
            counts = self._counts[key] = "".join(
                f"{verb.lower()}={count} " for verb, count in key
            ) + f"commands={sum(commands.values())}"
        # Like Postfix, what did not happen is not shown: errors only when there were some.
        errors_text = f" errors={errors}" if errors else ""
        tls_text = f" tls={tls.split(' with', 1)[0]}" if tls else ""
        user_text = "" if auth is None else f" user={printable(auth)}"
        listener_text = "" if listener is None else f" listener={listener}"
        where = f"[{peer}]:{port}" if ":" in peer else f"{peer}:{port}"  # IPv6 bracketed
        self._add(f"disconnect from {where}{listener_text} {counts}"
                  f"{errors_text}{tls_text}{user_text} end={end}")

    def _add(self, text: str) -> None:
        milliseconds = time.time_ns() // 1_000_000
        second = milliseconds // 1000
        if second != self._second:
            self._new_second(second)
        self._hold(f"{self._stamp}{_MILLIS[milliseconds % 1000]}{self._prefix}{text}\n")

    def _new_second(self, second: int) -> None:
        self._second = second
        self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))

    def _through_logging(self, line: str) -> None:
        """Not a plain stream: the line's text as a record, the slow, general way."""
        self._logger.info("%s", line[len(self._stamp) + len(_MILLIS[0]) + len(self._prefix):-1])

    def _add_json(self, fields: dict[str, object], listener: str | None,
                  auth: str | None) -> None:
        """`fields` as a line, then the listener and the user where there are some."""
        document = {"time": timestamp(time.time()), "pid": self._pid, "level": "INFO",
                    **fields}
        if listener is not None:
            document["listener"] = listener
        if auth is not None:
            document["user"] = printable(auth, "")  # as text shows it: no control or bidi
        # ASCII only: valid JSON whatever the stream's encoding (backslashreplace would
        # write Python escapes, not JSON ones).
        self._hold(json.dumps(document) + "\n")

    def _hold(self, line: str) -> None:
        """Keep `line` in the slot; written out HOLD_S after the first line held. Not a
        plain stream (no descriptor, so no JSON either): through `logging` at once."""
        if self._fd is None:
            self._through_logging(line)
            return
        data = line.encode(self._encoding, "backslashreplace")
        if self._slot.add(data):
            if self.due == _NEVER:
                self.due = time.monotonic() + HOLD_S
        else:
            self._overflow(data)

    def _overflow(self, data: bytes) -> None:
        """`data` did not fit: out with what the slot holds, then start again with it."""
        self.flush()
        if self._slot.add(data):
            self.due = time.monotonic() + HOLD_S
        else:  # a line longer than the whole slot
            write_lines(self._fd, data)

    def flush(self) -> None:
        """Write the held lines out now."""
        self.due = _NEVER
        self._slot.write_out(self._fd)

    def close(self) -> None:
        self.flush()
        if self._filter is not None:
            for handler in self._root.handlers:
                handler.removeFilter(self._filter)


class _FlushFirst(logging.Filter):
    """Before any other record of the thread that makes the lines (the worker's loop) is
    written, the held lines go out. Records of other threads (an AUTH check's) are not
    ordered with the loop's lines anyway, and the slot is the loop's alone: a flush from
    another thread could send a piece twice and upset the slot's counts."""

    def __init__(self, log: MessageLog) -> None:
        super().__init__()
        self._log = log
        self._thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        if threading.get_ident() == self._thread:
            self._log.flush()
        return True


def log_stream() -> int | None:
    """The descriptor workers write their lines to (see _plain_stream), or None; its
    handler is flushed first, so bytes written to it now follow what logging held."""
    return _plain_stream(logging.getLogger().handlers)[0]


def _plain_stream(handlers: list[logging.Handler]) -> tuple[int | None, str, bool]:
    """The descriptor of the one stream handler that `logsetup` installs, its encoding,
    and whether it writes JSON; None where logging is set up otherwise (lines then go
    through `logging`, as text)."""
    if len(handlers) != 1 or type(handlers[0]) is not logging.StreamHandler:
        return None, "utf-8", False
    handler = handlers[0]
    formatter = handler.formatter
    as_json = isinstance(formatter, JsonFormatter)
    if not as_json and (formatter is None or formatter._fmt != LOG_FORMAT):
        return None, "utf-8", False
    try:
        handler.flush()
        stream = handler.stream
        return stream.fileno(), getattr(stream, "encoding", None) or "utf-8", as_json
    except (AttributeError, OSError, ValueError):
        return None, "utf-8", False


SHOWN_CHARS = 256  # of client text in a log field; how many more is said, not shown
_IN_FIELD = " \\="  # escaped in a field of its own (user=...)
_IN_ADDRESS = " \\"  # in from=<...>: "=" is common in addresses (SRS, BATV), and harmless


def _shown(text: str) -> str:
    """At most SHOWN_CHARS of `text`, and how many were left out."""
    if len(text) <= SHOWN_CHARS:
        return text
    return f"{text[:SHOWN_CHARS]}...(+{len(text) - SHOWN_CHARS})"


def printable(text: str, escaped: str = _IN_FIELD) -> str:
    """`text` for a log line of space-separated fields: the characters of `escaped` and
    what is not printable escaped, so client text cannot forge fields or lines; cut to
    SHOWN_CHARS characters, so that it cannot make a line past one atomic write."""
    text = _shown(text)
    if text.isprintable() and not any(c in text for c in escaped):
        return text
    return "".join(c if c.isprintable() and c not in escaped else
                   f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
                   for c in text)
