"""A body's receive buffer in a real Worker on socketpairs: bursts of a few KB are read
with one read each once the buffer has grown, and the worker's tick gives the large
buffer back for bodies that have stopped or slowed to a trickle, not for those still
streaming."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from minismtp.session import Session
from minismtp.smtp.protocol import Settings
from minismtp.worker import Worker
from support.inprocess import worker_in_process

SMALL, LARGE = Settings().command_buffer_bytes, Settings().data_buffer_bytes
OPEN = (b"EHLO c.example\r\n", b"MAIL FROM:<a@example.org>\r\n",
        b"RCPT TO:<b@example.org>\r\n", b"DATA\r\n")
LINE = b"x" * 78 + b"\r\n"


@pytest.fixture
def worker() -> Iterator[Worker]:
    with worker_in_process({"limits.min_data_rate": 0}) as worker:
        yield worker


def in_body(worker: Worker, port: int) -> tuple[Session, socket.socket]:
    """A session of `worker` past its 354, and the client's end of it."""
    ours, theirs = socket.socketpair()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    worker._start_sessions([(ours, ("127.0.0.1", port), next(iter(worker.profiles)))])
    session = worker.sessions[ours.fileno()]
    theirs.settimeout(5)
    assert theirs.recv(4096).startswith(b"220 ")
    for command in OPEN:  # one at a time, as a client without PIPELINING
        theirs.sendall(command)
        worker.read(session)
        theirs.recv(4096)
    assert session.conn.state.name == "DATA"
    return session, theirs


def count_reads(session: Session) -> list[int]:
    """The session's reads from now on, counted into the list returned."""
    reads = [0]
    read_into = session.transport.read_into

    def counting(view: memoryview) -> int:
        reads[0] += 1
        return read_into(view)
    session.transport.read_into = counting
    return reads


def burst(worker: Worker, session: Session, client: socket.socket, size: int) -> None:
    """`size` bytes of body at once, then one wake-up of the worker for them."""
    client.sendall((LINE * (size // len(LINE) + 1))[:size])
    worker.turn.body_bytes = 0  # each call is a loop turn of its own
    worker.read(session)


@pytest.mark.parametrize("size", [6000, 16000])
def test_a_body_in_bursts_is_read_once_per_burst(worker, size):
    session, client = in_body(worker, 40000)
    reads = count_reads(session)
    burst(worker, session, client, size)  # fills the small buffer: grown, read on
    assert session.conn.buffer.capacity == LARGE
    reads[0] = 0
    for _ in range(200):
        burst(worker, session, client, size)
    assert reads[0] == 200  # one read per burst: no growth, no trim in between
    assert session.conn.buffer.capacity == LARGE
    assert session.data_bytes == 201 * size


def test_the_tick_trims_a_body_idle_or_trickling_and_keeps_one_streaming(worker):
    streaming, to_streaming = in_body(worker, 40000)
    idle, to_idle = in_body(worker, 40001)
    trickling, to_trickling = in_body(worker, 40002)
    for session, client in ((streaming, to_streaming), (idle, to_idle),
                            (trickling, to_trickling)):
        burst(worker, session, client, 6000)
        assert session.conn.buffer.capacity == LARGE
    worker._tick(time.monotonic())  # each brought 6 KB since its DATA: all keep it
    assert {s.conn.buffer.capacity for s in (streaming, idle, trickling)} == {LARGE}
    for _ in range(10):  # the next second: 60 KB, nothing, 620 bytes
        burst(worker, streaming, to_streaming, 6000)
        burst(worker, trickling, to_trickling, 62)
    worker._tick(time.monotonic())
    assert streaming.conn.buffer.capacity == LARGE
    assert idle.conn.buffer.capacity == SMALL
    assert trickling.conn.buffer.capacity == SMALL
    # The trickle goes on in the small buffer; a burst that fills it grows it again.
    burst(worker, trickling, to_trickling, 62)
    assert trickling.conn.buffer.capacity == SMALL
    burst(worker, idle, to_idle, 6000)
    assert idle.conn.buffer.capacity == LARGE
    # Trimmed or not, every body arrives whole.
    for session, client in ((streaming, to_streaming), (idle, to_idle),
                            (trickling, to_trickling)):
        client.sendall(b"\r\n.\r\n")  # the trickle ended mid-line
        worker.read(session)
        assert client.recv(4096).startswith(b"250 ")
        assert session.conn.buffer.capacity == SMALL
