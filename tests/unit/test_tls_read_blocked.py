"""A TLS read that must write first, in a worker's loop.

Under TLS 1.3 a client may ask for a KeyUpdate and never read: the server's answer then
waits in OpenSSL for a full socket, and every read first tries to send it (SSL_read
wants to write). The client's own bytes stay unread, so the socket stays readable: the
loop must watch it for WRITE alone (READ would wake it at once, to fail again: a busy
loop), and read again once it is writable.

The session's TlsTransport wraps a scripted stand-in for the SSL socket whose reads and
writes say what OpenSSL would; the descriptor is a real socketpair's, so the worker's
epoll reports what it would for such a client.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator

import pytest

from minismtp.loop import READ, WRITE
from minismtp.session import Session
from minismtp.smtp import replies
from minismtp.tlstransport import TlsTransport
from minismtp.worker import Worker
from support.inprocess import worker_in_process

WANT_WRITE, WANT_READ = ssl.SSLWantWriteError, ssl.SSLWantReadError


class ScriptedSSL:
    """What TlsTransport uses of an SSLSocket (and of its `_sslobj`), over the server end
    of a socketpair. Each read takes the next step of `reads`: an exception to raise, or
    bytes to return (WANT_READ once they run out); a write raises WANT_WRITE while
    `writes_blocked`, else takes everything."""

    def __init__(self, sock: socket.socket, reads: list) -> None:
        self.sock = sock
        self._sslobj = self
        self.reads = reads
        self.read_calls = 0
        self.writes_blocked = False
        self.sent = bytearray()

    def read(self, size: int, view: memoryview) -> int:
        self.read_calls += 1
        step = self.reads.pop(0) if self.reads else WANT_READ
        if isinstance(step, type):
            raise step()
        view[:len(step)] = step
        return len(step)

    def send(self, data: bytes) -> int:
        if self.writes_blocked:
            raise WANT_WRITE()
        self.sent += data
        return len(data)

    def pending(self) -> int:
        return 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def unwrap(self) -> None:
        pass

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def worker() -> Iterator[Worker]:
    with worker_in_process() as worker:
        yield worker


@pytest.fixture
def client(worker) -> Iterator[socket.socket]:
    """The client's end of a session greeted in plaintext, then switched to a scripted
    TLS transport (as after a handshake)."""
    ours, theirs = socket.socketpair()
    listener = next(iter(worker.profiles))
    worker._start_sessions([(ours, ("127.0.0.1", 40000), listener)])
    theirs.settimeout(5)
    assert theirs.recv(4096).startswith(b"220 ")
    (session,) = worker.sessions.values()
    session.transport = TlsTransport(ScriptedSSL(ours, []))  # type: ignore[arg-type]
    yield theirs
    theirs.close()


def the_session(worker: Worker) -> tuple[Session, ScriptedSSL]:
    (session,) = worker.sessions.values()
    return session, session.transport.sock


def turn(worker: Worker) -> list[int]:
    """One turn of the worker's loop for its sessions (as Worker.run dispatches them):
    what epoll reported, then the timers due."""
    masks = []
    for owner, mask in worker.poller.poll(0):
        if isinstance(owner, Session):
            masks.append(mask)
            if mask & WRITE:
                worker.flush(owner)
            if mask & READ and not owner.closed:
                worker._on_readable(owner)
    worker.now = time.monotonic()
    worker.timers.expire(worker.now, worker._on_deadline)
    return masks


def test_a_read_that_must_write_watches_write_alone_then_reads_again(worker, client):
    session, ssl_sock = the_session(worker)
    ssl_sock.reads[:] = [WANT_WRITE, b"NOOP\r\n"]
    client.sendall(b"x" * 100)  # unread client bytes: the socket stays readable
    worker.read(session)  # a READ event; the KeyUpdate's answer does not fit
    assert ssl_sock.read_calls == 1
    assert session.transport.read_wants == WRITE
    assert session.mask == WRITE  # not READ | WRITE: READ is ready, in vain
    # The socketpair is writable, so epoll reports it; a full socket would report
    # nothing at all. Either way, never READ while the read waits to write.
    assert turn(worker) == [WRITE]
    # Writable: the read is retried at once (the record goes out, NOOP comes in).
    assert ssl_sock.read_calls >= 2
    assert bytes(ssl_sock.sent) == replies.OK.wire
    assert session.transport.read_wants == READ
    assert session.mask == READ and not session.closed


def test_pending_replies_and_a_blocked_read_both_wait_for_writability(worker, client):
    session, ssl_sock = the_session(worker)
    ssl_sock.reads[:] = [WANT_WRITE, b"NOOP\r\n"]
    worker.read(session)
    assert session.mask == WRITE
    session.transport.pending = replies.OK.wire  # a reply the socket did not take
    ssl_sock.writes_blocked = True
    assert turn(worker) == [WRITE]  # the write blocks: no read meanwhile
    assert ssl_sock.read_calls == 1 and session.mask == WRITE
    ssl_sock.writes_blocked = False
    turn(worker)  # the reply goes out, then the read is retried
    assert bytes(ssl_sock.sent) == replies.OK.wire * 2  # the old reply, NOOP's
    assert session.transport.pending == b""
    assert session.mask == READ and not session.closed


def test_a_client_that_never_reads_is_closed_at_its_deadline(worker, client):
    session, ssl_sock = the_session(worker)
    ssl_sock.reads[:] = [WANT_WRITE]
    ssl_sock.writes_blocked = True  # for good: the client reads nothing
    worker.read(session)
    assert session.mask == WRITE
    worker.now = time.monotonic() + session.profile.command_timeout + 1
    worker.timers.expire(worker.now, worker._on_deadline)
    assert session.closed and not worker.sessions
    assert session.end.startswith("timeout")
