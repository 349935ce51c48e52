"""The per-message lines: the same text as a logging record, in order, whole lines per write."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import threading
from pathlib import Path

import pytest

from minismtp import logboard, msglog
from minismtp.logsetup import LOG_FORMAT, JsonFormatter
from minismtp.logboard import SLOT_BYTES, LogBoard
from minismtp.msglog import HOLD_S, MessageLog

def stored(log: MessageLog, queue_id: str, size: int = 100) -> str:
    """Log a stored message; the text its line must carry."""
    log.message(queue_id, "127.0.0.1", "a@example.org", 1, size, None, "250 queued")
    return f"id={queue_id} peer=127.0.0.1 from=<a@example.org> rcpts=1 size={size} result=250 queued"


LINE_PREFIX = "2026-12-07 08:00:00,000 minismtp[{pid}] INFO "  # as long as any
LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} minismtp\[(\d+)\] (\w+) (.*)")


class Logs:
    """A logger tree of its own, set up as `minismtp serve` sets up the root: one stream
    handler with LOG_FORMAT. Its own manager keeps it out of `logging`'s registry: pytest
    adds its capturing handlers to the real root and (pytest >= 9.1) to every registered
    logger that does not propagate, and with a second handler the lines would rightly go
    through `logging` instead of being held."""

    def __init__(self, root: logging.RootLogger) -> None:
        self.root = root

    def message_log(self, slot=None) -> MessageLog:
        return MessageLog(self.worker, self.root, slot)

    @property
    def worker(self) -> logging.Logger:
        return self.root.manager.getLogger("worker")

    def use_json(self) -> None:
        """`logging.format: json`: the handler's formatter is logsetup's JsonFormatter."""
        self.root.handlers[0].setFormatter(JsonFormatter())

    def records(self) -> list[dict]:
        """Every line written so far, as the JSON object it is."""
        stream = self.root.handlers[0].stream
        stream.flush()
        return [json.loads(line) for line in
                pathlib.Path(stream.name).read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def logfile(tmp_path: Path):
    root = logging.RootLogger(logging.INFO)
    root.manager = logging.Manager(root)  # its loggers' parent: this root, not the real one
    stream = open(tmp_path / "log", "w", encoding="utf-8")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logger = Logs(root)

    def lines() -> list[tuple[str, str, str]]:
        stream.flush()
        text = (tmp_path / "log").read_text(encoding="utf-8")
        return [LINE.fullmatch(line).groups() for line in text.splitlines()]

    yield logger, lines
    root.handlers.clear()
    stream.close()


def test_a_line_reads_like_a_logging_record(logfile):
    logger, lines = logfile
    log = logger.message_log()
    assert log.enabled
    text = stored(log, "Q1")
    logger.worker.info("id=2 through logging")
    log.close()
    pid = str(os.getpid())
    assert lines() == [(pid, "INFO", text), (pid, "INFO", "id=2 through logging")]


def test_nothing_is_written_before_the_turn_ends(logfile):
    logger, lines = logfile
    log = logger.message_log()
    first, second = stored(log, "Q1"), stored(log, "Q2")
    assert lines() == []
    log.flush()
    assert [message for _, _, message in lines()] == [first, second]
    log.close()


def test_other_records_of_the_process_come_after_the_lines_before_them(logfile):
    logger, lines = logfile
    log = logger.message_log()
    first = stored(log, "Q1")
    logger.worker.error("a storage error")
    second = stored(log, "Q2")
    log.close()
    assert [(level, message) for _, level, message in lines()] == [
        ("INFO", first), ("ERROR", "a storage error"), ("INFO", second)]


def test_each_write_is_whole_lines_within_pipe_buf(logfile, monkeypatch):
    logger, lines = logfile
    log = logger.message_log()
    sizes: list[int] = []
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        sizes.append(len(data))
        assert data.endswith(b"\n")
        return real_write(fd, data)

    monkeypatch.setattr(msglog.os, "write", write)
    for n in range(200):
        stored(log, f"Q{n}")
    log.flush()
    assert len(sizes) > 1 and max(sizes) <= logboard.ATOMIC_BYTES
    assert [message.split()[0] for _, _, message in lines()] == [f"id=Q{n}" for n in range(200)]
    log.close()


def test_a_partial_write_is_completed(logfile, monkeypatch):
    logger, lines = logfile
    log = logger.message_log()
    real_write = os.write
    monkeypatch.setattr(msglog.os, "write", lambda fd, data: real_write(fd, data[:7]))
    text = stored(log, "Q7")
    log.close()
    assert [message for _, _, message in lines()] == [text]


def test_disabled_above_info(logfile):
    logger, lines = logfile
    logger.root.setLevel(logging.WARNING)
    assert not logger.message_log().enabled


def test_logging_set_up_otherwise_gets_the_lines_through_logging(logfile):
    logger, lines = logfile
    root = logger.root
    root.handlers[0].setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    root.addHandler(Collect())
    log = logger.message_log()
    text = stored(log, "Q1")
    log.close()
    assert records == [text]


def test_a_session_summary_names_its_commands_and_how_it_ended(logfile):
    logger, lines = logfile
    log = logger.message_log()
    log.session("192.0.2.7", 40001, {"EHLO": 1, "MAIL": 1, "RCPT": 2, "DATA": 1, "QUIT": 1},
                1, "quit", "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)")
    log.session("192.0.2.8", 40002, {}, 0, "TLS handshake failed: timeout", None)
    log.session("2001:db8::fff:0:7", 1, {}, 0, "quit", None)  # not 2001:db8::fff:0:7:1
    log.close()
    assert [message for _, _, message in lines()] == [
        "disconnect from 192.0.2.7:40001 ehlo=1 mail=1 rcpt=2 data=1 quit=1 commands=6 "
        "errors=1 tls=TLSv1.3 end=quit",
        "disconnect from 192.0.2.8:40002 commands=0 end=TLS handshake failed: timeout",
        "disconnect from [2001:db8::fff:0:7]:1 commands=0 end=quit",
    ]


def test_sessions_of_one_shape_share_its_rendered_counts_within_a_bound(logfile, monkeypatch):
    """The counts of a session shape are rendered once; the same verbs with other counts,
    or in another order, are another shape; the kept renderings are bounded."""
    monkeypatch.setattr(msglog, "_COUNTS_KEPT", 2)
    logger, lines = logfile
    log = logger.message_log()
    shapes = [{"EHLO": 1, "QUIT": 1}, {"EHLO": 1, "QUIT": 1}, {"EHLO": 2, "QUIT": 1},
              {"QUIT": 1, "EHLO": 2}, {"NOOP": 3}, {"EHLO": 1, "QUIT": 1}]
    for port, commands in enumerate(shapes, 40000):
        log.session("192.0.2.7", port, commands, 0, "quit", None)
        assert len(log._counts) <= 2
    log.close()
    assert [message.split(" ", 3)[3] for _, _, message in lines()] == [
        "ehlo=1 quit=1 commands=2 end=quit", "ehlo=1 quit=1 commands=2 end=quit",
        "ehlo=2 quit=1 commands=3 end=quit", "quit=1 ehlo=2 commands=3 end=quit",
        "noop=3 commands=3 end=quit", "ehlo=1 quit=1 commands=2 end=quit"]


def test_json_lines_carry_the_fields(logfile):
    logger, lines = logfile
    logger.use_json()
    log = logger.message_log()
    log.message("Q1", "127.0.0.1", 'a"b@example.org', 2, 100, None, "250 queued")
    logger.worker.warning("a warning")
    log.session("127.0.0.1", 40000, {"EHLO": 1}, 0, "quit", None)
    log.close()
    records = logger.records()
    assert [record["level"] for record in records] == ["INFO", "WARNING", "INFO"]
    assert {k: records[0][k] for k in ("event", "id", "from", "rcpts", "size", "result")} == {
        "event": "message", "id": "Q1", "from": 'a"b@example.org', "rcpts": 2, "size": 100,
        "result": "250 queued"}
    assert records[1]["message"] == "a warning" and records[1]["pid"] == os.getpid()
    assert records[2]["event"] == "disconnect" and records[2]["commands"] == {"EHLO": 1}
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d{4}", r["time"])
               for r in records)


def test_an_authenticated_user_is_named_and_escaped(logfile):
    """user=<user> on both lines (the session's auth= is its count of AUTH commands, as
    ehlo= is of EHLO); a user name is client text, so what could forge a field or a line
    (space, "=", backslash, control characters) is escaped."""
    logger, lines = logfile
    log = logger.message_log()
    log.message("Q1", "127.0.0.1", "a@example.org", 1, 100, None, "250 queued", "alice")
    log.session("127.0.0.1", 40000, {"AUTH": 1}, 0, "quit", None, "bob x=1\nend=\\")
    log.close()
    assert [message for _, _, message in lines()] == [
        "id=Q1 peer=127.0.0.1 from=<a@example.org> rcpts=1 size=100 user=alice "
        "result=250 queued",
        "disconnect from 127.0.0.1:40000 auth=1 commands=1 user=bob\\x20x\\x3d1\\x0aend\\x3d\\x5c "
        "end=quit",
    ]


def test_a_quoted_sender_cannot_forge_fields(logfile):
    """A quoted local part may hold spaces and "=": its spaces are escaped, so what
    follows them stays inside from=<...>; "=" stays (SRS and BATV senders are full of it)."""
    logger, lines = logfile
    log = logger.message_log()
    forged = '"x> rcpts=9 auth=admin result=250 queued x"@example.org'
    log.message("Q1", "127.0.0.1", forged, 1, 18, None, "550 refused")
    log.message("Q2", "127.0.0.1", "SRS0=ab=c=x@example.org", 1, 18, None, "250 queued")
    log.close()
    assert [message for _, _, message in lines()] == [
        'id=Q1 peer=127.0.0.1 from=<"x>\\x20rcpts=9\\x20auth=admin\\x20result=250\\x20'
        'queued\\x20x"@example.org> rcpts=1 size=18 result=550 refused',
        "id=Q2 peer=127.0.0.1 from=<SRS0=ab=c=x@example.org> rcpts=1 size=18 result=250 queued",
    ]


def test_a_long_user_name_is_cut_so_a_line_stays_one_write(logfile):
    """AUTH lines may be 12 KB, and escaping makes a byte up to six characters: the name
    is cut to SHOWN_CHARS, and how much was left out is said."""
    logger, lines = logfile
    log = logger.message_log()
    log.session("127.0.0.1", 40000, {"AUTH": 1}, 0, "quit", None, "\x01" * 9000)
    log.close()
    [(_, _, message)] = lines()
    shown = "\\x01" * msglog.SHOWN_CHARS
    assert message == f"disconnect from 127.0.0.1:40000 auth=1 commands=1 user={shown}" \
        f"...(+{9000 - msglog.SHOWN_CHARS}) end=quit"
    assert len(message.encode()) < 4096 - 100


def test_json_lines_name_the_user_only_when_there_is_one(logfile):
    logger, _ = logfile
    logger.use_json()
    log = logger.message_log()
    log.message("Q1", "127.0.0.1", "a@example.org", 1, 100, None, "250 queued", "al ice")
    log.session("127.0.0.1", 40000, {}, 0, "quit", None)
    log.close()
    records = logger.records()
    assert records[0]["user"] == "al ice" and "user" not in records[1]


def test_json_lines_are_ascii_with_the_user_escaped_as_in_text(logfile, tmp_path):
    """Valid JSON whatever the stream's encoding (ASCII escapes only), and a user name
    that authenticated shows no control, C1 or bidi character, as on a text line."""
    logger, _ = logfile
    logger.use_json()
    log = logger.message_log()
    user = "al\x1b[31m\x9b\u202eice\u2028\udcff"
    log.message("Q1", "127.0.0.1", "z\u00f6\u7528@example.org", 1, 100, None, "250 queued",
                user)
    log.close()
    raw = (tmp_path / "log").read_bytes()
    assert raw.isascii(), raw
    [record] = logger.records()
    assert record["user"] == "al\\x1b[31m\\x9b\\u202eice\\u2028\\udcff"
    assert record["from"] == "z\u00f6\u7528@example.org"  # JSON's own escapes, read back


def test_printable_leaves_ordinary_names_alone():
    assert msglog.printable("alice@example.org") == "alice@example.org"
    assert msglog.printable("zoë") == "zoë"
    assert msglog.printable("a\udcffb") == "a\\udcffb"  # a byte that was not UTF-8


def test_the_listener_is_named_after_the_peer(logfile):
    logger, lines = logfile
    log = logger.message_log()
    log.message("Q1", "127.0.0.1", "a@example.org", 1, 100, None, "250 queued",
                listener="mx")
    log.session("127.0.0.1", 40000, {"QUIT": 1}, 0, "quit", None, listener="127.0.0.1:2525")
    log.close()
    assert [message for _, _, message in lines()] == [
        "id=Q1 peer=127.0.0.1 listener=mx from=<a@example.org> rcpts=1 size=100 "
        "result=250 queued",
        "disconnect from 127.0.0.1:40000 listener=127.0.0.1:2525 quit=1 commands=1 end=quit",
    ]


def test_json_lines_name_the_listener(logfile):
    logger, _ = logfile
    logger.use_json()
    log = logger.message_log()
    log.message("Q1", "127.0.0.1", "a@example.org", 1, 100, None, "250 queued",
                listener="chaos")
    log.session("127.0.0.1", 40000, {}, 0, "quit", None, listener="chaos")
    log.close()
    records = logger.records()
    assert [(record["event"], record["listener"]) for record in records] == [
        ("message", "chaos"), ("disconnect", "chaos")]


@pytest.fixture
def slot():
    """A worker's slot of the master's board (logboard.py)."""
    board = LogBoard(1)
    yield board.slot(0)
    board.close()


def test_lines_wait_in_shared_memory_until_the_first_is_hold_s_old(logfile, slot, monkeypatch):
    """Each line goes to the slot as it is made; the loop writes the slot out once
    `due` (HOLD_S after the first held line) has come, and is not woken up otherwise."""
    logger, lines = logfile
    clock = [100.0]
    monkeypatch.setattr(msglog.time, "monotonic", lambda: clock[0])
    log = logger.message_log(slot)
    assert log.due == float("inf")  # nothing held: the loop never wakes up for the log
    first = stored(log, "Q1")
    assert lines() == [] and slot.waiting == len(first.encode()) + 1 + len(
        LINE_PREFIX.format(pid=os.getpid()))
    assert log.due == 100.0 + HOLD_S
    clock[0] += HOLD_S / 2
    second = stored(log, "Q2")
    assert log.due == 100.0 + HOLD_S  # the first line's time
    log.flush()  # what the loop does once due
    assert [message for _, _, message in lines()] == [first, second]
    assert slot.waiting == 0 and log.due == float("inf")
    clock[0] = 200.0
    third = stored(log, "Q3")
    assert log.due == 200.0 + HOLD_S  # a new batch, a new time
    log.close()
    assert [message for _, _, message in lines()][2:] == [third]


def test_a_full_slot_is_written_out_before_the_line_that_does_not_fit(logfile, slot):
    logger, lines = logfile
    log = logger.message_log(slot)
    sent = []
    while not lines():
        sent.append(stored(log, f"Q{len(sent)}"))
    assert SLOT_BYTES // 150 < len(sent) < SLOT_BYTES // 50  # about a slot's worth
    assert [message for _, _, message in lines()] == sent[:-1]
    assert slot.waiting > 0 and log.due < float("inf")  # the last line, held anew
    log.close()
    assert [message for _, _, message in lines()] == sent


def test_a_line_longer_than_the_slot_goes_out_after_the_held_ones(logfile, slot):
    logger, lines = logfile
    log = logger.message_log(slot)
    stored(log, "Q1")
    log.message("Q2", "127.0.0.1", "a" * SLOT_BYTES + "@example.org", 1, 5, None, "250 queued")
    assert [message.split()[0] for _, _, message in lines()] == ["id=Q1", "id=Q2"]
    assert slot.waiting == 0
    stored(log, "Q3")
    log.close()
    assert [message.split()[0] for _, _, message in lines()] == ["id=Q1", "id=Q2", "id=Q3"]


def test_other_records_come_after_the_held_lines(logfile, slot):
    logger, lines = logfile
    log = logger.message_log(slot)
    held = [stored(log, "Q1"), stored(log, "Q2")]
    logger.worker.warning("a warning")
    assert [(level, message) for _, level, message in lines()] == [
        ("INFO", held[0]), ("INFO", held[1]), ("WARNING", "a warning")]
    assert slot.waiting == 0 and log.due == float("inf")
    log.close()


def test_a_clean_stop_writes_what_the_slot_holds(logfile, slot):
    logger, lines = logfile
    log = logger.message_log(slot)
    texts = [stored(log, "Q1"), stored(log, "Q2")]
    assert lines() == []
    log.close()
    assert [message for _, _, message in lines()] == texts and slot.waiting == 0


def test_without_a_plain_stream_nothing_is_held(logfile, slot):
    logger, _ = logfile
    logger.root.handlers[0].setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    records: list[str] = []
    logger.root.handlers[0].emit = lambda record: records.append(record.getMessage())
    log = logger.message_log(slot)
    texts = [stored(log, "Q1")]
    log.session("127.0.0.1", 40000, {"QUIT": 1}, 0, "quit", None)
    texts.append("disconnect from 127.0.0.1:40000 quit=1 commands=1 end=quit")
    assert records == texts  # at once, through logging, the line's text alone
    assert slot.waiting == 0 and log.due == float("inf")
    log.close()


def test_records_of_another_thread_leave_the_held_lines_alone(logfile, slot):
    """Only the loop's thread makes lines and writes its slot out: a record of another
    thread (an AUTH check's) does not flush it, so the two never write a slot at once."""
    logger, lines = logfile
    log = logger.message_log(slot)
    texts = [stored(log, f"Q{n}") for n in range(3)]
    other = threading.Thread(target=logger.worker.error, args=("from another thread",))
    other.start()
    other.join()
    assert [message for _, _, message in lines()] == ["from another thread"]
    assert slot.waiting > 0
    others = []
    for n in range(3, 2000):  # other threads log while lines are made and written
        texts.append(stored(log, f"Q{n}"))
        if n % 50 == 0:
            others.append(threading.Thread(target=logger.worker.error, args=(f"other {n}",)))
            others[-1].start()
    for thread in others:
        thread.join()
    log.close()
    made = [message for _, level, message in lines() if level == "INFO"]
    assert made == texts  # each line once, whole, in order
