"""A worker's counters reach the shared board at its regular publish, refusals the core
makes in a session still open included, each counted once."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from minismtp.worker import Worker
from support.inprocess import worker_in_process


@pytest.fixture
def worker() -> Iterator[Worker]:
    with worker_in_process() as worker:
        yield worker


def open_session(worker: Worker) -> socket.socket:
    """A client connected to `worker`, greeted; its end of the connection."""
    ours, theirs = socket.socketpair()
    listener = next(iter(worker.profiles))
    worker._start_sessions([(ours, ("127.0.0.1", 40000), listener)])
    theirs.settimeout(5)
    assert theirs.recv(4096).startswith(b"220 ")
    return theirs


def send(worker: Worker, client: socket.socket, commands: bytes) -> bytes:
    client.sendall(commands)
    (session,) = worker.sessions.values()
    worker.read(session)
    return client.recv(4096)


def published_rejections(worker: Worker) -> dict[int, int]:
    return worker.stats_board.read(worker.slot).rejections


def test_refusals_of_an_open_session_are_published_at_the_next_tick(worker):
    client = open_session(worker)
    try:
        replies = send(worker, client, b"HELO client.example\r\nRCPT TO:<a@example.org>\r\n"
                                       b"DATA\r\n")
        assert replies.count(b"503 ") == 2
        worker._tick(time.monotonic())
        assert published_rejections(worker) == {503: 2}  # the session is still open
        worker._tick(time.monotonic())
        assert published_rejections(worker) == {503: 2}  # not counted again
        send(worker, client, b"RCPT TO:<b@example.org>\r\n")
        (session,) = worker.sessions.values()
        worker.close(session, "test")
        worker._tick(time.monotonic())
        assert published_rejections(worker) == {503: 3}  # the last one at close, once
    finally:
        client.close()
