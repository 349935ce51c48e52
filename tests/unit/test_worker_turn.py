"""A worker's loop turn takes a bounded amount of body: with several sessions streaming
bare-LF bodies, a turn ends once it has taken its share, and in the next the sessions
read least recently go first, also when more are ready than one poll returns. A real
`Worker.run()` in a forked child, its clients here."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading

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


def run_worker(ours: list[socket.socket], out: int) -> None:
    """In the child: a Worker with the sessions on `ours`, until SIGQUIT; its turns'
    log, as JSON, to `out`."""
    worker_module._TURN_BODY_BYTES = BOUND
    config = load_config(overrides={"server.listen": ["127.0.0.1:0"],
                                    "server.sched_batch": False})
    listener = socket.socket()
    worker = worker_module.Worker(config, [(listener, config.server.listen[0])],
                                  DiscardBackend(), HeartbeatBoard(1), 0, StatsBoard(1, 8))
    turn = worker.turn = RecordingTurn()
    read = worker._on_readable

    def recording(session) -> None:
        before = session.data_bytes
        read(session)
        if session.data_bytes > before:
            turn.log[-1]["reads"].append((session.peer.port, session.data_bytes - before))
    worker._on_readable = recording  # run() takes it from here
    worker._start_sessions([(sock, ("127.0.0.1", 40000 + i), listener)
                            for i, sock in enumerate(ours)])
    try:
        worker.run()
    except SystemExit:
        pass
    os.write(out, json.dumps([t for t in turn.log if t["reads"]]).encode())


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
    pairs = [socket.socketpair() for _ in range(STREAMERS)]
    ours, theirs = [a for a, _ in pairs], [b for _, b in pairs]
    log_read, log_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        try:
            for sock in theirs:
                sock.close()
            os.close(log_read)
            run_worker(ours, log_write)
        finally:
            os._exit(0)
    os.close(log_write)
    for sock in ours:
        sock.close()
    replies: list[bytes] = []
    try:
        for sock in theirs:
            sock.settimeout(30)
        threads = [threading.Thread(target=stream, args=(sock, replies)) for sock in theirs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        os.kill(pid, signal.SIGQUIT)
        log = b""
        while chunk := os.read(log_read, 1 << 16):
            log += chunk
        os.close(log_read)
        os.waitpid(pid, 0)
        for sock in theirs:
            sock.close()
    assert sorted(reply[:4] for reply in replies) == [b"250 "] * STREAMERS
    turns = json.loads(log)
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


def count_reads(ours: list[socket.socket], out: int) -> None:
    """In the child: a Worker with the sessions on `ours`, polls of POLL_EVENTS events,
    until SIGQUIT; the body reads per session (by client port), as JSON, to `out`."""
    from minismtp import poller

    poller._MAX_EVENTS = POLL_EVENTS
    worker_module._TURN_BODY_BYTES = BOUND
    config = load_config(overrides={"server.listen": ["127.0.0.1:0"],
                                    "server.sched_batch": False})
    listener = socket.socket()
    worker = worker_module.Worker(config, [(listener, config.server.listen[0])],
                                  DiscardBackend(), HeartbeatBoard(1), 0, StatsBoard(1, 8))
    reads: dict[int, int] = {}
    read = worker._on_readable

    def counting(session) -> None:
        before = session.data_bytes
        read(session)
        if session.data_bytes > before:
            reads[session.peer.port] = reads.get(session.peer.port, 0) + 1
    worker._on_readable = counting
    worker._start_sessions([(sock, ("127.0.0.1", 40000 + i), listener)
                            for i, sock in enumerate(ours)])
    try:
        worker.run()
    except SystemExit:
        pass
    os.write(out, json.dumps(reads).encode())


def test_more_streamers_than_a_poll_returns_are_all_read_in_turn():
    """Epoll hands out at most a poll's worth of ready events, the rest in later polls:
    the sessions a turn left waiting are often not among the next turn's events, so who
    goes first is kept per session (its last body read), not per turn. Every streamer
    is read, about as often as the others; none waits until its deadline."""
    import select
    import time

    pairs = [socket.socketpair() for _ in range(MANY)]
    ours, theirs = [a for a, _ in pairs], [b for _, b in pairs]
    log_read, log_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        try:
            for sock in theirs:
                sock.close()
            os.close(log_read)
            count_reads(ours, log_write)
        finally:
            os._exit(0)
    os.close(log_write)
    for sock in ours:
        sock.close()
    line = b"y\n" * 32768  # bare LFs, endless: no body ends in the test's time
    try:
        with select.epoll() as ready:
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
    finally:
        os.kill(pid, signal.SIGQUIT)
        log = b""
        while chunk := os.read(log_read, 1 << 16):
            log += chunk
        os.close(log_read)
        os.waitpid(pid, 0)
        for sock in theirs:
            sock.close()
    reads = json.loads(log)
    counts = sorted(reads.get(str(40000 + i), 0) for i in range(MANY))
    median = counts[MANY // 2]
    assert median >= 5, counts
    assert counts[0] >= median // 3, counts  # the least read within a few of the rest
