"""A worker's loop turn takes a bounded amount of body: with several sessions streaming
bare-LF bodies, a turn ends once it has taken its share, and in the next the sessions
read least recently go first, also when more are ready than one poll returns. A real
`Worker.run()` in a forked child, its clients here."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from minismtp import poller
from minismtp import worker as worker_module
from minismtp.config import load_config
from minismtp.delivery.null import DiscardBackend
from minismtp.heartbeat import HeartbeatBoard
from minismtp.stats import StatsBoard
from minismtp.turn import Turn

STREAMERS = 4
BODY = b"\n" * (3 << 20)  # bare LFs: the dearest body per byte to take in
BOUND = 300_000  # smaller than the real one, so that a socketpair's buffer or two fill it
MAX_READ = 256 * 1024  # the DATA buffer: a turn's last read may go past the bound by this
OPEN = b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"


class RecordingTurn(Turn):
    """A Turn that notes, per turn, whether the last one ended early and which session
    read how many body bytes."""

    __slots__ = ("log", "after_cut")

    def __init__(self) -> None:
        self.log: list[dict] = []
        self.after_cut = False
        super().__init__(worker_module._in_body)

    @property
    def events(self):  # type: ignore[override]
        return Turn.events.__get__(self)  # type: ignore[attr-defined]

    @events.setter
    def events(self, value) -> None:  # the loop sets it once a turn
        Turn.events.__set__(self, value)  # type: ignore[attr-defined]
        self.log.append({"after_cut": self.after_cut, "reads": []})
        self.after_cut = False

    def least_read_first(self, events):
        self.after_cut = True
        return super().least_read_first(events)


def serve_in_child(ours: list[socket.socket], out: int, on_read, turn: Turn | None = None
                   ) -> None:
    """In the child: a Worker with the sessions on `ours` and the turn bound BOUND, until
    SIGQUIT; `on_read(session, bytes)` after each body read; then what `on_read.result()`
    gives, as JSON, to `out`."""
    worker_module._TURN_BODY_BYTES = BOUND
    config = load_config(overrides={"server.listen": ["127.0.0.1:0"],
                                    "server.sched_batch": False})
    listener = socket.socket()
    worker = worker_module.Worker(config, [(listener, config.server.listen[0])],
                                  DiscardBackend(), HeartbeatBoard(1), 0, StatsBoard(1, 8))
    if turn is not None:
        worker.turn = turn
    read = worker._on_readable

    def recording(session) -> None:
        before = session.data_bytes
        read(session)
        if session.data_bytes > before:
            on_read(session.peer.port, session.data_bytes - before)
    worker._on_readable = recording  # run() takes it from here
    worker._start_sessions([(sock, ("127.0.0.1", 40000 + i), listener)
                            for i, sock in enumerate(ours)])
    try:
        worker.run()
    except SystemExit:
        pass
    os.write(out, json.dumps(on_read.result()).encode())


@contextmanager
def forked_worker(sessions: int, child) -> Iterator[tuple[list[socket.socket], list]]:
    """`child(ours, out)` serves `sessions` socketpairs in a forked process; the block
    gets the clients' ends and a list, which holds the child's JSON after it."""
    pairs = [socket.socketpair() for _ in range(sessions)]
    ours, theirs = [a for a, _ in pairs], [b for _, b in pairs]
    log_read, log_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        try:
            for sock in theirs:
                sock.close()
            os.close(log_read)
            child(ours, log_write)
        finally:
            os._exit(0)
    os.close(log_write)
    for sock in ours:
        sock.close()
    result: list = []
    try:
        yield theirs, result
    finally:
        os.kill(pid, signal.SIGQUIT)
        log = b""
        while chunk := os.read(log_read, 1 << 16):
            log += chunk
        os.close(log_read)
        os.waitpid(pid, 0)
        for sock in theirs:
            sock.close()
        result.append(json.loads(log))


class TurnLog:
    """on_read for the first test: each read into its turn's entry of a RecordingTurn."""

    def __init__(self, turn: RecordingTurn) -> None:
        self.turn = turn

    def __call__(self, port: int, n: int) -> None:
        self.turn.log[-1]["reads"].append((port, n))

    def result(self) -> list[dict]:
        return [t for t in self.turn.log if t["reads"]]


class ReadCounts(dict):
    """on_read for the second test: body reads per client port."""

    def __call__(self, port: int, n: int) -> None:
        self[port] = self.get(port, 0) + 1

    def result(self) -> dict:
        return self


def stream(client: socket.socket, replies: list[bytes]) -> None:
    client.sendall(OPEN + BODY + b"\r\n.\r\n")
    got = b""
    while b"\r\n" not in got.partition(b"354 ")[2].partition(b"\r\n")[2]:
        chunk = client.recv(4096)  # up to the reply after the 354: the message's
        if not chunk:
            break
        got += chunk
    replies.append(got.splitlines()[-1])


def test_a_turn_ends_at_its_body_bound_and_the_others_go_first_in_the_next():
    def child(ours, out):
        turn = RecordingTurn()
        serve_in_child(ours, out, TurnLog(turn), turn)

    replies: list[bytes] = []
    with forked_worker(STREAMERS, child) as (theirs, result):
        for sock in theirs:
            sock.settimeout(30)
        threads = [threading.Thread(target=stream, args=(sock, replies)) for sock in theirs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert sorted(reply[:4] for reply in replies) == [b"250 "] * STREAMERS
    [turns] = result
    per_turn = [sum(n for _, n in t["reads"]) for t in turns]
    assert max(per_turn) < BOUND + MAX_READ  # over by one read at most
    cuts = [(before, t) for before, t in zip(turns, turns[1:]) if t["after_cut"]]
    assert len(cuts) >= 3, per_turn  # 12 MiB in turns of some 300 KB
    for before, t in cuts:  # those the last turn did not read go before those it did
        order = list(dict.fromkeys(port for port, _ in t["reads"]))
        read_before = {port for port, _ in before["reads"]}
        fresh = [i for i, port in enumerate(order) if port not in read_before]
        assert fresh == list(range(len(fresh))), (before, t)
    assert any(port not in {p for p, _ in before["reads"]}
               for before, t in cuts for port, _ in t["reads"])  # some waited, then read
    ports = {port for t in turns for port, _ in t["reads"]}
    assert ports == {40000 + i for i in range(STREAMERS)}  # every streamer read


MANY = 48  # streamers, against polls of POLL_EVENTS events
POLL_EVENTS = 8  # stands for the real 256, so that a few dozen sessions outnumber a poll
STREAM_S = 3.0


def test_more_streamers_than_a_poll_returns_are_all_read_in_turn():
    """Epoll hands out at most a poll's worth of ready events, the rest in later polls:
    the sessions a turn left waiting are often not among the next turn's events, so who
    goes first is kept per session (its last body read), not per turn. Every streamer
    is read, about as often as the others; none waits until its deadline."""
    def child(ours, out):
        poller._MAX_EVENTS = POLL_EVENTS
        serve_in_child(ours, out, ReadCounts())

    line = b"y\n" * 32768  # bare LFs, endless: no body ends in the test's time
    with forked_worker(MANY, child) as (theirs, result), select.epoll() as ready:
        for sock in theirs:
            sock.sendall(OPEN)
            sock.setblocking(False)
            ready.register(sock.fileno(), select.EPOLLOUT)
        by_fd = {sock.fileno(): sock for sock in theirs}
        stop = time.monotonic() + STREAM_S
        while time.monotonic() < stop:
            for fd, _ in ready.poll(0.1):
                try:
                    by_fd[fd].send(line)
                except OSError:
                    pass
    [reads] = result
    counts = sorted(reads.get(str(40000 + i), 0) for i in range(MANY))
    median = counts[MANY // 2]
    assert median >= 5, counts
    assert counts[0] >= median // 3, counts  # the least read within a few of the rest
