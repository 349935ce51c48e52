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

A stalled reader (logstream.py): the stream takes no more, so the lines stay in the slot
and the loop tries again every RETRY_S; the loop's own records wait there behind them.
Records of the worker's other threads wait in the handler's backlog while the stream
(a socket, which may take part of a piece) has part of a slot line, then follow its rest.
Lines that find the slot full are dropped and counted in the slot, and once the stream
has taken every held line, one line says how many. At exit the worker waits a second at
most, then leaves the rest, and the count, in the slot for its master.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

from minismtp.logboard import SLOT_BYTES, LogBoard, LogSlot
from minismtp.logsetup import LOG_FORMAT, JsonFormatter, timestamp
from minismtp.logstream import (
    CLOSE_WAIT_S, LogHandler, LogStream, dropped_record, write_pieces,
)

_COUNTS_KEPT = 256  # rendered command counts of sessions, by their counts
# How long lines may wait in the slot: a reader of the log sees them this late at most,
# and a worker at full speed writes once per few hundred lines instead of once per turn.
HOLD_S = 0.1
# While the stream takes no more (its reader stalled), how often the loop tries again.
RETRY_S = 0.2
_NEVER = float("inf")
_MILLIS = tuple(f",{n:03d}" for n in range(1000))  # a line's timestamp's last field


class MessageLog:
    """One line per message, at level INFO, batched; see the module docstring."""

    __slots__ = ("enabled", "json", "due", "_logger", "_root", "_counts", "_out",
                 "_encoding", "_handler", "_behind", "_slot", "_pid", "_prefix", "_second",
                 "_stamp", "_filter")

    def __init__(self, logger: logging.Logger, root: logging.Logger | None = None,
                 slot: LogSlot | None = None) -> None:
        """`logger` says whether INFO is on; `root` (the root logger) holds the handler
        whose stream the lines go to; `slot`: the worker's, on its master's LogBoard."""
        self.enabled = logger.isEnabledFor(logging.INFO)
        self._logger = logger
        self._root = root = root or logging.getLogger()
        self._counts: dict[tuple[tuple[str, int], ...], str] = {}  # see session()
        self._out, self._encoding, self.json = _plain_stream(root.handlers)
        # The server's handler (logstream.py), whose held records go out before our lines.
        handler = root.handlers[0] if self._out is not None else None
        self._handler = handler if isinstance(handler, LogHandler) else None
        self._behind = False  # the stream left lines held at the last flush
        self._slot = slot if slot is not None else LogBoard(1).slot(0)
        # When the held lines are to be written out (time.monotonic(), as the loop's
        # clock): HOLD_S after the first of them; never while none are held.
        self.due = _NEVER
        self._pid = os.getpid()
        self._prefix = f" minismtp[{self._pid}] INFO "
        self._second = -1
        self._stamp = ""
        self._filter: _FlushFirst | None = None
        if self.enabled and self._out is not None:
            self._filter = _FlushFirst(self)
            for handler in root.handlers:
                handler.addFilter(self._filter)
            if self._handler is not None:
                self._handler.slot = self._slot  # a line written in part goes first

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
        if self._out is None:
            self._through_logging(line)
            return
        data = line.encode(self._encoding, "backslashreplace")
        if self._slot.add(data):
            if self.due == _NEVER:
                self.due = time.monotonic() + HOLD_S
        else:
            self._overflow(data)

    def _overflow(self, data: bytes) -> None:
        """`data` did not fit: out with what the slot holds, then start again with it.
        While the stream takes nothing (the reader stalled), lines that do not fit are
        dropped and counted, with no write tried before the loop's next retry."""
        if not self._behind:
            self.flush()
        if self._slot.add(data):
            if self.due == _NEVER:
                self.due = time.monotonic() + HOLD_S
        elif self._behind or len(data) <= SLOT_BYTES:
            self._slot.dropped += 1
        elif self._handler is not None:  # a line longer than the whole slot
            self._handler.hold_lines(data)  # written there, under its lock
        else:
            write_pieces(self._out, data)

    def hold_record(self, data: bytes) -> None:
        """A record of the loop's thread, formatted, while lines wait before it."""
        if not self._slot.add(data):
            self._slot.dropped += data.count(b"\n")

    def flush(self) -> None:
        """Write the held lines out, as far as the stream takes them now."""
        self.due = _NEVER
        handler = self._handler
        if handler is None:
            self._write_out()
            return
        with handler.lock:  # records of other threads are written under it too
            self._write_out()

    def _write_out(self) -> None:
        """One order for all: the rest of a line the stream took in part; then what the
        handler holds (records made before our held lines, and other threads' records
        held behind that rest); then our lines."""
        handler, slot = self._handler, self._slot
        if not slot.finish_line(self._out):
            self._fall_behind()
            return
        if handler is not None and handler.holding:
            handler.flush()
            if handler.holding:
                self._fall_behind()
                return
        slot.write_out(self._out)
        if slot.waiting:
            self._fall_behind()
            return
        self._behind = False
        if slot.dropped:
            self._report_dropped()

    def _fall_behind(self) -> None:
        self._behind = True
        self.due = time.monotonic() + RETRY_S

    def _report_dropped(self) -> None:
        """The stream took every held line again: say how many were dropped."""
        slot = self._slot
        slot.add(self.formatted(dropped_record(slot.dropped)))
        slot.dropped = 0
        slot.write_out(self._out)
        if slot.waiting:
            self._fall_behind()

    def formatted(self, record: logging.LogRecord) -> bytes:
        """`record` as the root's one handler writes it."""
        handler = self._root.handlers[0]
        return (handler.format(record) + "\n").encode(self._encoding, "backslashreplace")

    @property
    def behind(self) -> bool:
        """Whether lines or records wait for the stream (the loop's tick retries then)."""
        return self._behind or (self._handler is not None and self._handler.holding)

    def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """Write what is held, waiting `wait_s` at most for a stalled stream; what is
        left stays in the slot, for the master to write once it has reaped us."""
        if self._out is not None:
            deadline = time.monotonic() + wait_s
            self.flush()
            while self.behind and (left := deadline - time.monotonic()) > 0:
                self._out.wait_writable(min(left, RETRY_S))
                self.flush()
            if self.behind:
                self._leave_in_slot()
        if self._filter is not None:
            for handler in self._root.handlers:
                handler.removeFilter(self._filter)
            if self._handler is not None and self._handler.slot is self._slot:
                self._handler.slot = None

    def _leave_in_slot(self) -> None:
        """At exit, behind: the handler's held records after the slot's lines (our memory
        dies with us, the slot does not), its count of dropped lines added to the slot's;
        the master writes them, and says how many were dropped."""
        if self._handler is not None:
            with self._handler.lock:
                backlog = self._handler.backlog
                self._slot.dropped += backlog.dropped
                backlog.dropped = 0
                self.hold_record(backlog.take())


class _FlushFirst(logging.Filter):
    """Before any other record of the thread that makes the lines (the worker's loop) is
    written, the held lines go out. Records of other threads (an AUTH check's) are not
    ordered with the loop's lines anyway, and the slot is the loop's alone: a flush from
    another thread could send a piece twice and upset the slot's counts. They still wait
    for the rest of a line the stream took in part (LogHandler.slot)."""

    def __init__(self, log: MessageLog) -> None:
        super().__init__()
        self._log = log
        self._thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        if threading.get_ident() != self._thread:
            return True
        log = self._log
        log.flush()
        if not log.behind:
            return True
        # The stream is behind: the record waits in the slot, after the lines before it.
        log.hold_record(log.formatted(record))
        return False


def log_stream() -> int | None:
    """The descriptor workers write their lines to (see _plain_stream), or None; a
    plain StreamHandler's is flushed first, so bytes written to it now follow what
    logging held. (The master asks logstream.log_handler() first: this is for logging
    set up otherwise, by tests and tools.)"""
    out = _plain_stream(logging.getLogger().handlers)[0]
    return None if out is None else out.fd


def _plain_stream(handlers: list[logging.Handler]) -> tuple[LogStream | None, str, bool]:
    """The stream of the one handler that `logsetup` installs (logstream.LogHandler, or a
    StreamHandler set up alike: written plainly), its encoding, and whether it writes
    JSON; None where logging is set up otherwise (lines then go through `logging`, as
    text)."""
    if len(handlers) != 1 or type(handlers[0]) not in (logging.StreamHandler, LogHandler):
        return None, "utf-8", False
    handler = handlers[0]
    formatter = handler.formatter
    as_json = isinstance(formatter, JsonFormatter)
    if not as_json and (formatter is None or formatter._fmt != LOG_FORMAT):
        return None, "utf-8", False
    if isinstance(handler, LogHandler):
        return handler.out, handler.encoding, as_json
    try:
        handler.flush()
        stream = handler.stream
        return (LogStream(stream.fileno()), getattr(stream, "encoding", None) or "utf-8",
                as_json)
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
