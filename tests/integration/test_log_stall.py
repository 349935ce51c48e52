"""A log reader that stops reading: the server goes on serving mail and obeying signals,
drops log lines rather than wait, and says how many once the reader is back."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import smtplib
import threading
import time

from support.server import Server, wait_until

F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, from Python 3.10 on Linux
LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} minismtp\[\d+\] "
                  r"(DEBUG|INFO|WARNING|ERROR) \S.*")
FILLER = b"filler written by the test\n"


class StalledReader(Server):
    """A server whose standard error (a pipe of one page) the test stops reading."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reading = threading.Event()
        self.reading.set()

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        fcntl.fcntl(self.proc.stderr.fileno(), getattr(fcntl, "F_SETPIPE_SZ", F_SETPIPE_SZ),
                    4096)
        while True:
            self.reading.wait()
            raw = self.proc.stderr.readline()
            if not raw:
                return
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()

    def stall(self) -> None:
        """Stop reading, then fill the pipe: through a description of our own (a
        non-blocking one: the server's stays as it is)."""
        self.reading.clear()
        fd = os.open(f"/proc/{self.pid}/fd/2", os.O_WRONLY | os.O_NONBLOCK)
        try:
            for _ in range(3):  # the reader may have been inside a read when told to stop
                try:
                    while True:
                        os.write(fd, FILLER)
                except BlockingIOError:
                    pass
                time.sleep(0.2)
        finally:
            os.close(fd)


def send(port: int, sessions: int, per_session: int, deadline: float) -> int:
    sent = 0
    for _ in range(sessions):
        with smtplib.SMTP("127.0.0.1", port, timeout=max(0.1, deadline - time.monotonic())) \
                as client:
            for _ in range(per_session):
                client.sendmail("a@example.org", ["b@example.org"],
                                b"Subject: stalled log\r\n\r\nhello\r\n")
                sent += 1
    assert time.monotonic() < deadline
    return sent


def test_a_stalled_log_reader_stops_neither_mail_nor_the_master(tmp_path):
    server = StalledReader(tmp_path, {"server": {"workers": 2},
                                      "logging": {"level": "debug"}})
    try:
        server.start()
        server.stall()
        # Hundreds of lines (a message, a session, a debug line per session) where a
        # page fits a few dozen: every worker's slot fills and overflows.
        sent = send(server.port, 40, 10, time.monotonic() + 30)
        server.send_signal(signal.SIGTTIN)  # its line cannot be written: acted on anyway
        workers = wait_until(lambda: len(server.worker_pids()) == 3 and server.worker_pids(),
                             10, message="a third worker, after TTIN")
        os.kill(workers[0], signal.SIGKILL)
        wait_until(lambda: workers[0] not in server.worker_pids()
                   and len(server.worker_pids()) == 3, 10, message="the killed one replaced")
        sent += send(server.port, 2, 10, time.monotonic() + 10)
        mark = server.mark()
        server.reading.set()
        server.wait_for_log(r"WARNING \d+ log lines dropped: the log stream did not take "
                            r"them", timeout=10, since=mark)
        server.wait_for_log(rf"worker {workers[0]} was killed by signal 9", timeout=10)
        assert server.stop() == 0
        assert len(server.files("new")) == sent
        text = server.log_text()
        assert "workers: 3" in text
        for line in server.lines:  # whole lines only: none cut, none run into another
            assert line == FILLER.decode().rstrip("\n") or LINE.fullmatch(line), line
    finally:
        server.reading.set()
        server.kill()


def test_a_log_reader_that_never_comes_back_holds_up_neither_reload_nor_stop(tmp_path):
    """Workers log nothing at `warning`: what would wait here is the master, whose reload
    and stop lines are logged at any level."""
    server = StalledReader(tmp_path, {"server": {"workers": 1},
                                      "logging": {"level": "warning"}})
    try:
        server.start()
        (old,) = server.worker_pids()
        server.stall()
        sent = send(server.port, 3, 5, time.monotonic() + 10)
        server.send_signal(signal.SIGHUP)  # a reload logs several lines: none can go out
        wait_until(lambda: server.worker_pids() and old not in server.worker_pids(), 10,
                   message="the reloaded generation")
        sent += send(server.port, 1, 5, time.monotonic() + 10)
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.wait(10) == 0  # each process waited a second at most for the reader
        assert time.monotonic() - started < 8
        assert len(server.files("new")) == sent
    finally:
        server.reading.set()
        server.kill()
