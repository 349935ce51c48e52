"""The log stream written without waiting: a pipe, terminal or socket whose reader stalls
takes nothing and nothing waits; whole lines only; what is held is bounded, what is
dropped is counted and reported once the stream takes lines again."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pty
import socket
import subprocess
import sys
import threading
import time

import pytest
from support.logstreams import Budget

from minismtp import logstream
from minismtp.logboard import ATOMIC_BYTES, SLOT_BYTES, LogBoard
from minismtp.logsetup import LOG_FORMAT, JsonFormatter
from minismtp.logstream import Backlog, LogHandler, LogStream, write_pieces
from minismtp.msglog import RETRY_S, MessageLog


def blocking(fd: int) -> bool:
    return not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK


def fill(stream: LogStream) -> int:
    """Write lines until the stream takes none, not even a newline (a pipe adds a short
    write to its last page while it has room); the bytes it took."""
    taken = 0
    for size in (100, 10, 1):
        line = b"f" * (size - 1) + b"\n"
        while written := stream.write(line):
            assert written == len(line)  # whole or nothing
            taken += written
    return taken


class Pipe:
    """A pipe whose reader the test controls: standard error to a reader that stalls."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe()
        os.set_blocking(self.read_end, False)
        self.stream = LogStream.open(self.write_end)

    def read(self) -> bytes:
        chunks = []
        while True:
            try:
                chunk = os.read(self.read_end, 1 << 16)
            except BlockingIOError:
                return b"".join(chunks)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def close(self) -> None:
        self.stream.close()
        os.close(self.read_end)
        os.close(self.write_end)


@pytest.fixture
def pipe():
    made = Pipe()
    yield made
    made.close()


class Piecemeal:
    """A stream that takes `sizes` bytes per write in turn (0: nothing now)."""

    def __init__(self, *sizes: int) -> None:
        self.sizes = list(sizes)
        self.out = bytearray()

    def write(self, data: bytes) -> int:
        size = min(len(data), self.sizes.pop(0) if self.sizes else len(data))
        self.out += data[:size]
        return size


# -- the stream, by what standard error is ---------------------------------------------

def test_a_pipe_is_written_through_a_non_blocking_description_of_its_own(pipe):
    assert pipe.stream.kind == "pipe" and pipe.stream.fd != pipe.write_end
    assert not blocking(pipe.stream.fd)
    assert blocking(pipe.write_end)  # what the shell and other processes share: as it was
    taken = fill(pipe.stream)
    assert pipe.stream.write(b"one more\n") == 0  # full: nothing taken, nothing waited for
    data = pipe.read()
    assert len(data) == taken and data.endswith(b"\n")
    assert pipe.stream.write(b"one more\n") == 9


def test_a_pipe_takes_a_piece_of_pipe_buf_whole_or_not_at_all(pipe):
    fill(pipe.stream)
    os.read(pipe.read_end, 50)  # room for less than a piece
    piece = b"p" * (ATOMIC_BYTES - 1) + b"\n"
    assert pipe.stream.write(piece) in (0, len(piece))


def test_a_terminal_is_written_through_a_description_of_its_own():
    controller, terminal = pty.openpty()
    try:
        stream = LogStream.open(terminal)
        assert stream.kind == "pipe" and not blocking(stream.fd) and blocking(terminal)
        deadline = time.monotonic() + 5
        while stream.write(b"x" * 99 + b"\n") and time.monotonic() < deadline:
            pass  # nobody reads the terminal: it fills, and then takes nothing
        assert time.monotonic() < deadline
        stream.close()
    finally:
        os.close(controller)
        os.close(terminal)


def test_a_socket_is_sent_to_without_waiting_and_left_blocking():
    ours, reader = socket.socketpair()
    try:
        stream = LogStream.open(ours.fileno())
        assert stream.kind == "socket"
        fill(stream)
        assert stream.write(b"one more\n") == 0
        assert ours.getblocking()  # MSG_DONTWAIT: no flag changed on the shared description
        stream.close()
        assert ours.fileno() >= 0  # a duplicate was closed, not standard error
    finally:
        ours.close()
        reader.close()


def test_a_file_is_written_plainly_and_appended_to(tmp_path):
    path = tmp_path / "log"
    path.write_bytes(b"before\n")
    with open(path, "ab", buffering=0) as file:
        stream = LogStream.open(file.fileno())
        assert stream.kind == "plain" and stream.fd == file.fileno()  # not reopened
        os.lseek(file.fileno(), 0, os.SEEK_SET)
        assert stream.write(b"after\n") == 6
    assert path.read_bytes() == b"before\nafter\n"  # O_APPEND kept


def test_a_pipe_that_cannot_be_opened_again_is_written_when_poll_says_so(pipe, monkeypatch):
    def refused(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(logstream.os, "open", refused)
    stream = LogStream.open(pipe.write_end)
    assert stream.kind == "polled" and stream.fd == pipe.write_end
    monkeypatch.undo()
    started = time.monotonic()
    fill(stream)  # the description is blocking: were a write tried, it would wait here
    assert time.monotonic() - started < 5
    assert stream.write(b"one more\n") == 0


# -- whole lines -------------------------------------------------------------------------

def test_a_piece_taken_in_part_is_finished_before_the_next():
    data = b"".join(f"line {n}\n".encode() for n in range(3))
    stream = Piecemeal(3, 2, 0)
    stopped = write_pieces(stream, data)
    assert stopped == 5 and bytes(stream.out) == b"line "  # inside the first line
    assert write_pieces(stream, data, stopped) == len(data)
    assert bytes(stream.out) == data


def test_pieces_are_whole_lines_within_pipe_buf():
    data = b"".join(f"{n:05d} ".encode().ljust(99, b"x") + b"\n" for n in range(200))
    pieces: list[bytes] = []

    class Recorder:
        def write(self, piece: bytes) -> int:
            pieces.append(bytes(piece))
            return len(piece)

    assert write_pieces(Recorder(), data) == len(data)
    assert b"".join(pieces) == data
    assert all(len(p) <= ATOMIC_BYTES and p.endswith(b"\n") for p in pieces)


def test_a_slot_written_in_part_goes_on_from_the_middle_of_its_line():
    board = LogBoard(1)
    try:
        slot = board.slot(0)
        slot.add(b"first line\nsecond\n")
        stream = Piecemeal(4, 0)
        assert slot.write_out(stream) == 4 and slot.waiting == 14
        assert slot.next_piece() == b"t line\nsecond\n"
        assert slot.write_out(stream) == 14 and bytes(stream.out) == b"first line\nsecond\n"
        slot.add(b"held\n")
        slot.dropped = 3
        assert board.take(0) == (b"held\n", 3) and (slot.waiting, slot.dropped) == (0, 0)
    finally:
        board.close()


# -- what is held, what is dropped -----------------------------------------------------

def test_a_backlog_holds_whole_records_within_its_bound_and_counts_the_rest():
    backlog = Backlog(limit=100)
    assert backlog.add(b"a" * 59 + b"\n")
    assert not backlog.add(b"two\nlines\n" + b"b" * 40 + b"\n")  # past the bound: whole
    assert backlog.dropped == 3 and len(backlog) == 60
    assert backlog.add(b"c" * 39 + b"\n")  # exactly full
    stream = Piecemeal(10, 0)
    assert not backlog.write_to(stream) and len(backlog) == 90
    assert backlog.write_to(stream) and bytes(stream.out) == b"a" * 59 + b"\n" + b"c" * 39 + b"\n"
    empty = Backlog(limit=10)
    assert empty.add(b"a record longer than the bound\n")  # alone, it is taken


def handler_on(stream: LogStream, formatter: logging.Formatter | None = None) -> LogHandler:
    handler = LogHandler(None, stream)
    handler.setFormatter(formatter or logging.Formatter(LOG_FORMAT))
    handler.backlog.limit = 2000
    return handler


def record(message: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("minismtp.master", level, __file__, 1, message, (), None)


def test_a_handler_holds_what_a_stalled_stream_refuses_and_says_what_it_dropped(pipe):
    handler = handler_on(pipe.stream)
    fill(pipe.stream)
    started = time.monotonic()
    for n in range(100):
        handler.handle(record(f"record {n}"))
    assert time.monotonic() - started < 1  # nothing waited
    assert handler.holding and handler.backlog.dropped > 0
    held = len(handler.backlog)
    handler.flush()  # still full: nothing more written
    assert len(handler.backlog) == held
    pipe.read()
    handler.flush()
    lines = pipe.read().decode().splitlines()
    kept = [line.rsplit(" ", 1)[1] for line in lines[:-1]]
    dropped = 100 - len(kept)
    assert kept == [str(n) for n in range(len(kept))]  # the oldest kept, in order
    assert lines[-1].endswith(f" WARNING {dropped} log lines dropped: the log stream did "
                              "not take them")
    assert not handler.holding and handler.backlog.dropped == 0


def test_the_dropped_line_is_json_in_json_format(pipe):
    handler = handler_on(pipe.stream, JsonFormatter())
    handler.backlog.limit = 100
    fill(pipe.stream)
    for n in range(5):
        handler.handle(record(f"record {n}"))
    pipe.read()
    handler.flush()
    documents = [json.loads(line) for line in pipe.read().splitlines()]
    assert documents[-1]["level"] == "WARNING" and documents[-1]["logger"] == "minismtp.log"
    assert documents[-1]["message"] == "4 log lines dropped: the log stream did not take them"


def test_lines_of_a_dead_worker_are_held_after_the_handler_s_own(pipe):
    handler = handler_on(pipe.stream)
    fill(pipe.stream)
    handler.handle(record("the master's"))
    handler.hold_lines(b"a worker's line\n", dropped=7)
    pipe.read()
    handler.flush()
    lines = pipe.read().decode().splitlines()
    assert lines[0].endswith(" INFO the master's") and lines[1] == "a worker's line"
    assert lines[2].endswith(" WARNING 7 log lines dropped: the log stream did not take them")
    assert len(lines) == 3


def test_drain_waits_a_bounded_time_for_a_stalled_stream(pipe):
    handler = handler_on(pipe.stream)
    fill(pipe.stream)
    handler.handle(record("held"))
    started = time.monotonic()
    handler.drain(0.3)
    assert 0.25 < time.monotonic() - started < 2 and handler.holding
    reader = threading.Timer(0.2, os.read, (pipe.read_end, 1 << 20))  # one read: room
    reader.start()
    handler.drain(5)  # the reader comes back: out as soon as it does
    reader.join()
    assert not handler.holding and pipe.read().endswith(b"INFO held\n")


def test_a_forked_worker_forgets_what_its_master_held(pipe):
    handler = handler_on(pipe.stream)
    fill(pipe.stream)
    handler.handle(record("the master's"))
    handler.forget_held()
    assert not handler.holding


# -- a worker's lines on a stalled stream ----------------------------------------------

@pytest.fixture
def worker_log(pipe):
    """A MessageLog on its master's slot, under a root set up as `minismtp serve` does."""
    root = logging.RootLogger(logging.INFO)
    root.manager = logging.Manager(root)
    handler = handler_on(pipe.stream)
    root.handlers[:] = [handler]
    board = LogBoard(1)
    log = MessageLog(root.manager.getLogger("worker"), root, board.slot(0))
    yield log, root.manager.getLogger("worker"), board.slot(0)
    board.close()


def stored(log: MessageLog, n: int) -> None:
    log.message(f"Q{n}", "127.0.0.1", "a@example.org", 1, 100, None, "250 queued")


def test_a_stalled_stream_keeps_the_lines_in_the_slot_and_retries_later(pipe, worker_log):
    log, logger, slot = worker_log
    fill(pipe.stream)
    stored(log, 1)
    log.flush()
    assert slot.waiting > 0 and log.behind
    assert 0 < log.due - time.monotonic() <= RETRY_S  # the loop tries again, not at once
    logger.warning("after Q1")  # the loop's own record: in the slot, behind Q1
    started = time.monotonic()
    n = 2
    while not slot.dropped:  # the slot fills; then lines are dropped and counted
        stored(log, n)
        n += 1
    assert time.monotonic() - started < 2 and slot.held > SLOT_BYTES - 300
    for m in range(n, n + 10):
        stored(log, m)
    logger.warning("no room: %s", "x" * 300)  # longer than what room is left
    assert slot.dropped == 12
    pipe.read()
    log.flush()
    lines = pipe.read().decode().splitlines()
    assert [line.split(" ", 4)[4] for line in lines[:3]] == [
        lines[0].split(" ", 4)[4], "after Q1", lines[2].split(" ", 4)[4]]
    assert [line.split(" ")[4] for line in lines[:3:2]] == ["id=Q1", "id=Q2"]
    assert lines[-2].split(" ")[4] == f"id=Q{n - 2}"  # the last that found room
    assert lines[-1].endswith("WARNING 12 log lines dropped: the log stream did not take them")
    assert not log.behind and slot.dropped == 0 and log.due == float("inf")


def test_a_record_held_by_the_handler_goes_out_before_later_lines(pipe, worker_log):
    log, logger, slot = worker_log
    fill(pipe.stream)
    logger.warning("first")  # nothing held in the slot: the handler holds it
    stored(log, 1)
    pipe.read()
    log.flush()
    lines = pipe.read().decode().splitlines()
    assert [line.split(" ", 4)[-1].split(" ")[0] for line in lines] == ["first", "id=Q1"]


def test_a_worker_closing_on_a_stalled_stream_waits_a_bounded_time(pipe, worker_log):
    log, logger, slot = worker_log
    fill(pipe.stream)
    stored(log, 1)
    other = threading.Thread(target=logger.error, args=("from another thread",))
    other.start()
    other.join()
    started = time.monotonic()
    log.close(wait_s=0.3)
    assert time.monotonic() - started < 2
    # Left for the master, in the slot: the line, then the other thread's record.
    left, dropped = slot.take()
    assert left.count(b"\n") == 2 and left.endswith(b"ERROR from another thread\n")


def test_a_backlog_behind_a_reader_slightly_slower_than_it_stays_bounded():
    backlog = Backlog(limit=10_000)
    stream = Budget(1000)
    line = b"x" * 199 + b"\n"
    for _ in range(2000):  # 1200 bytes held per round, 1000 taken
        for _ in range(6):
            backlog.add(line)
        stream.left = stream.size
        backlog.write_to(stream)
        assert len(backlog) <= backlog.limit + len(line)
        assert len(backlog._held) <= 2 * backlog.limit + len(line)  # the written part dropped
    assert backlog.dropped > 0
    assert bytes(stream.out) == line * (len(stream.out) // len(line))  # whole lines, in order


def test_another_thread_s_record_waits_for_the_rest_of_a_line_a_socket_took_in_part():
    ours, reader = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the least: sends in part
    reader.setblocking(False)
    root = logging.RootLogger(logging.INFO)
    root.manager = logging.Manager(root)
    root.handlers[:] = [handler_on(LogStream.open(ours.fileno()))]
    board = LogBoard(1)
    slot = board.slot(0)
    log = MessageLog(root.manager.getLogger("worker"), root, slot)
    got = bytearray()

    def receive(size: int = 1 << 20) -> None:
        try:
            while size > 0 and (chunk := reader.recv(min(size, 1 << 16))):
                got.extend(chunk)
                size -= len(chunk)
        except BlockingIOError:
            pass

    try:
        for n in range(100):
            log.message(f"Q{n:04d}".ljust(150, "x"), "192.0.2.1", "a@example.org", 1, 1000,
                        None, "250 queued")
        width = slot.held // 100  # every line as long
        log.flush()
        for size in (100, 300, 700, 1000, 1500, 2000, 2300, 2600, 3000, 3100, 3700):
            if (slot.held - slot.waiting) % width:
                break  # the socket took part of a line
            receive(size)
            log.flush()
        assert (slot.held - slot.waiting) % width
        receive()  # room again: the record could go at once, in the middle of the line
        other = threading.Thread(target=root.manager.getLogger("worker.commit").error,
                                 args=("from another thread",))
        other.start()
        other.join()
        for _ in range(200):
            log.flush()
            receive()
            if not log.behind:
                break
        lines = got.decode().splitlines()
        assert len(lines) == 101 and got.endswith(b"\n")
        assert sum(line.endswith(" ERROR from another thread") for line in lines) == 1
        assert all(line.endswith(" result=250 queued") for line in lines
                   if "ERROR" not in line)
        assert [line.split(" ")[4] for line in lines if "ERROR" not in line] == [
            f"id=Q{n:04d}".ljust(153, "x") for n in range(100)]
    finally:
        log.close(wait_s=0)
        board.close()
        root.handlers[0].out.close()
        ours.close()
        reader.close()


def test_python_warnings_do_not_wait_for_a_stalled_stream(tmp_path):
    """A warning (a library's, say) goes through the non-blocking handler: with standard
    error a full pipe nobody reads, warnings.warn returns, and the record is held."""
    script = tmp_path / "warn.py"
    script.write_text(
        "import fcntl, os, sys, warnings\n"
        "from minismtp.logsetup import setup_logging\n"
        "fcntl.fcntl(2, fcntl.F_SETFL, fcntl.fcntl(2, fcntl.F_GETFL) | os.O_NONBLOCK)\n"
        "try:\n"
        "    while True:\n"
        "        os.write(2, b'x' * 65536)\n"  # fill the pipe: its reader has stalled
        "except BlockingIOError:\n"
        "    pass\n"
        "fcntl.fcntl(2, fcntl.F_SETFL, fcntl.fcntl(2, fcntl.F_GETFL) & ~os.O_NONBLOCK)\n"
        "setup_logging('info')\n"
        "for n in range(3):\n"
        "    warnings.warn(f'warning {n}', UserWarning)\n"
        "os.write(1, b'returned')\n")
    read_end, write_end = os.pipe()
    try:
        ran = subprocess.run([sys.executable, str(script)], stderr=write_end,
                             stdout=subprocess.PIPE, timeout=20)
    finally:
        os.close(write_end)
        os.close(read_end)
    assert ran.stdout == b"returned"
