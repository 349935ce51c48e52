"""The log stream, written without ever waiting for its reader.

Untrusted input: none; what is written was formatted (and escaped) before it came here.

Standard error is often a pipe or a socket (a shell's `| less`, a log shipper, journald's
stream socket) whose reader can stop reading. Once the pipe is full, a blocking write
waits for the reader, and a worker waiting there serves no mail; a master waiting there
supervises nothing. So every write here returns at once: the bytes the stream took, 0 when
it takes none now. What it does not take is held (a worker's slot, logboard.py; a
handler's bounded backlog, below) and tried again later; past that bound lines are dropped,
counted, and the count is logged once the stream takes lines again.

How, by what standard error is (`LogStream.open`):
- a pipe, FIFO or terminal: opened anew through /proc/self/fd/2, a new open file
  description of the same pipe or terminal, made non-blocking. O_NONBLOCK on descriptor 2
  itself would change the description shared with the shell that started us (a terminal
  left non-blocking breaks the shell) and with every other process writing there.
- a socket: each send with MSG_DONTWAIT, which asks for no wait without any flag kept.
- a regular file or anything else: plain writes (O_APPEND kept, nothing reopened); a
  disk does not stall the way a reader does.

Lines stay whole: pieces are whole lines of at most PIPE_BUF bytes, which a pipe takes
whole or not at all; a longer line, or a socket or terminal taking part of a piece, leaves
the rest to be written first, before anything else. In a worker two things write (its
slot, from the loop's thread; the handler, from any thread), one at a time under the
handler's lock, and neither while the other has a line written in part.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import stat
import time

from minismtp.logboard import LogSlot, cut

HELD_BYTES = 64 * 1024  # a handler's records (and dead workers' lines) held at most
CLOSE_WAIT_S = 1.0  # at exit, how long held lines may wait for the stream to take them
DROPPED = "%d log lines dropped: the log stream did not take them"
_SEND_FLAGS = socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)


class LogStream:
    """A descriptor of the log and the way to write it without waiting."""

    __slots__ = ("fd", "kind", "_sock", "_poll", "_own")

    def __init__(self, fd: int, kind: str = "plain", sock: socket.socket | None = None,
                 own: bool = False) -> None:
        self.fd = fd
        # "plain" (a file: written as it is), "pipe" (a non-blocking description),
        # "socket" (MSG_DONTWAIT) or "polled" (a pipe we may not open again: see open())
        self.kind = kind
        self._sock = sock
        self._own = own  # opened here, closed here
        self._poll = select.poll()
        self._poll.register(fd, select.POLLOUT)

    @classmethod
    def open(cls, fd: int) -> LogStream:
        """The stream for descriptor `fd` (standard error), by what it is."""
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            return cls(fd)
        if stat.S_ISSOCK(mode):
            try:
                return cls(fd, "socket", socket.socket(fileno=os.dup(fd)), own=True)
            except OSError:
                return cls(fd, "polled")
        if stat.S_ISFIFO(mode) or os.isatty(fd):
            try:
                opened = os.open(f"/proc/self/fd/{fd}",
                                 os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY)
            except OSError:
                # No /proc, or a pipe another user made (`sudo -u ... 2>&1 | less`): write
                # only when poll() says a page is free. Processes sharing the pipe can
                # still race for the last page, so a write may then wait for the reader.
                return cls(fd, "polled")
            return cls(opened, "pipe", own=True)
        return cls(fd)

    def write(self, data: bytes) -> int:
        """Write what the stream takes now of `data`; return how much (0: none now). A
        stream that fails (its reader gone, a full disk) counts as taking everything: a
        log that cannot be written never stops mail, and nothing would ever read it."""
        try:
            if self._sock is not None:
                return self._sock.send(data, _SEND_FLAGS)
            if self.kind == "polled" and not self._poll.poll(0):
                return 0
            return os.write(self.fd, data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            return len(data)

    def wait_writable(self, timeout_s: float) -> None:
        """Wait at most `timeout_s` for the stream to take bytes again (at exit only)."""
        if self.kind != "plain":
            self._poll.poll(max(0, int(timeout_s * 1000)))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        elif self._own:
            os.close(self.fd)


def write_pieces(stream: LogStream, data: bytes | bytearray, start: int = 0) -> int:
    """Write whole-line pieces of `data` from `start` until the stream takes no more;
    return where writing stopped (inside a line only when a stream took part of a piece:
    its rest goes first next time)."""
    end = len(data)
    while start < end:
        written = stream.write(data[start:cut(data, start, end)])
        if not written:
            break
        start += written
    return start


class Backlog:
    """Whole lines held in memory, `limit` bytes at most, and how many were dropped."""

    __slots__ = ("limit", "dropped", "_held", "_start")

    def __init__(self, limit: int = HELD_BYTES) -> None:
        self.limit = limit
        self.dropped = 0  # lines not held for want of room, since the last report
        self._held = bytearray()
        self._start = 0  # bytes of _held written already

    def __len__(self) -> int:
        return len(self._held) - self._start

    def add(self, data: bytes) -> bool:
        """Hold `data` (whole lines) after the rest; when it does not fit, drop it whole
        and count its lines. A backlog holding nothing takes one record of any size."""
        if len(self) and len(self) + len(data) > self.limit:
            self.dropped += data.count(b"\n") or 1
            return False
        self._held += data
        return True

    def write_to(self, stream: LogStream) -> bool:
        """Write what the stream takes now; True once nothing is held."""
        if not len(self):
            return True
        self._start = write_pieces(stream, self._held, self._start)
        if self._start == len(self._held):
            self._held.clear()
            self._start = 0
            return True
        if self._start >= self.limit:
            # A reader that keeps up only just never lets the backlog empty: without
            # this, what was written stayed in memory, megabytes of it.
            del self._held[:self._start]
            self._start = 0
        return False

    def take(self) -> bytes:
        """What is held, no longer held (the part of a line written excepted)."""
        data = bytes(self._held[self._start:])
        self._held.clear()
        self._start = 0
        return data


class LogHandler(logging.StreamHandler):
    """The server's one log handler: each record formatted as StreamHandler does, written
    without waiting; what the stream does not take is held, within HELD_BYTES."""

    def __init__(self, stream, out: LogStream) -> None:  # `stream`: sys.stderr's object
        super().__init__(stream)
        self.out = out
        self.encoding = getattr(stream, "encoding", None) or "utf-8"
        self.backlog = Backlog()
        # The worker's slot (logboard.py), set by msglog.py: while the stream has taken
        # part of one of its lines, nothing is written here (records of any thread wait
        # in the backlog); the worker's loop writes that line's rest, then the backlog.
        self.slot: LogSlot | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = self.encoded(record)
        except Exception:
            self.handleError(record)
            return
        self._hold(data)

    def hold_lines(self, data: bytes, dropped: int = 0) -> None:
        """Lines formatted elsewhere (a dead worker's, logboard.py) after what is held,
        and a count of lines dropped there, reported with ours."""
        with self.lock:
            self.backlog.dropped += dropped
            if data:
                self.backlog.add(data)
            self._write_held()

    def _hold(self, data: bytes) -> None:
        self.backlog.add(data)
        self._write_held()

    def flush(self) -> None:
        """Write what is held, as far as the stream takes it now (never waits)."""
        with self.lock:
            self._write_held()

    @property
    def holding(self) -> bool:
        return len(self.backlog) > 0

    def _write_held(self) -> None:
        """Under self.lock, which is also held while the worker's slot is written."""
        if self.slot is not None and self.slot.in_line:
            return
        backlog = self.backlog
        if backlog.write_to(self.out) and backlog.dropped:
            count, backlog.dropped = backlog.dropped, 0
            backlog.add(self.dropped_line(count))
            backlog.write_to(self.out)

    def dropped_line(self, count: int) -> bytes:
        """The line that says `count` lines were dropped, in this handler's format."""
        return self.encoded(dropped_record(count))

    def encoded(self, record: logging.LogRecord) -> bytes:
        """`record` as this handler writes it."""
        return (self.format(record) + self.terminator).encode(self.encoding,
                                                               "backslashreplace")

    def drain(self, timeout_s: float = CLOSE_WAIT_S) -> None:
        """At exit: write what is held, waiting `timeout_s` at most for the stream."""
        deadline = time.monotonic() + timeout_s
        self.flush()
        while self.holding and (left := deadline - time.monotonic()) > 0:
            self.out.wait_writable(left)
            self.flush()

    def forget_held(self) -> None:
        """In a forked worker: what the master held is the master's to write."""
        self.backlog = Backlog(self.backlog.limit)


def dropped_record(count: int) -> logging.LogRecord:
    """The record that says `count` log lines were dropped."""
    return logging.LogRecord("minismtp.log", logging.WARNING, __file__, 0, DROPPED,
                             (count,), None)


def log_handler() -> LogHandler | None:
    """The root logger's LogHandler, when logging was set up by logsetup (the server)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LogHandler):
            return handler
    return None
