"""The per-message lines: the same text as a logging record, in order, whole lines per write."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest

from minismtp import msglog
from minismtp.logsetup import LOG_FORMAT
from minismtp.msglog import MessageLog

LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} minismtp\[(\d+)\] (\w+) (.*)")


class Logs:
    """A logger tree of its own (pytest puts handlers on the real root), set up as
    `minismtp serve` sets up the root: one stream handler with LOG_FORMAT."""

    def __init__(self, root: logging.Logger) -> None:
        self.root = root

    def message_log(self) -> MessageLog:
        return MessageLog(self.worker, self.root)

    @property
    def worker(self) -> logging.Logger:
        return self.root.getChild("worker")


@pytest.fixture
def logfile(tmp_path: Path):
    root = logging.getLogger(f"test-msglog-{tmp_path.name}")
    root.propagate = False
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
    log.add("id=1 peer=127.0.0.1 result=250 queued")
    logger.worker.info("id=2 through logging")
    log.close()
    pid = str(os.getpid())
    assert lines() == [(pid, "INFO", "id=1 peer=127.0.0.1 result=250 queued"),
                       (pid, "INFO", "id=2 through logging")]


def test_nothing_is_written_before_the_turn_ends(logfile):
    logger, lines = logfile
    log = logger.message_log()
    log.add("first")
    log.add("second")
    assert lines() == []
    log.flush()
    assert [message for _, _, message in lines()] == ["first", "second"]
    log.close()


def test_other_records_of_the_process_come_after_the_lines_before_them(logfile):
    logger, lines = logfile
    log = logger.message_log()
    log.add("a message")
    logger.worker.error("a storage error")
    log.add("another message")
    log.close()
    assert [(level, message) for _, level, message in lines()] == [
        ("INFO", "a message"), ("ERROR", "a storage error"), ("INFO", "another message")]


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
        log.add(f"id={n} " + "x" * 90)
    log.flush()
    assert len(sizes) > 1 and max(sizes) <= msglog._ATOMIC_BYTES
    assert [message.split()[0] for _, _, message in lines()] == [f"id={n}" for n in range(200)]
    log.close()


def test_a_partial_write_is_completed(logfile, monkeypatch):
    logger, lines = logfile
    log = logger.message_log()
    real_write = os.write
    monkeypatch.setattr(msglog.os, "write", lambda fd, data: real_write(fd, data[:7]))
    log.add("written seven bytes at a time")
    log.close()
    assert [message for _, _, message in lines()] == ["written seven bytes at a time"]


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
    log.add("through logging")
    log.close()
    assert records == ["through logging"]
