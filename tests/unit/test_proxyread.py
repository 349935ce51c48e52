"""proxyread.py over a real socket pair, with a stand-in for the loop: the header is taken
off the socket exactly, however it arrives, and what follows stays for the next reader."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from minismtp.delivery import Peer
from minismtp.loop import READ
from minismtp.poller import Poller
from minismtp.proxyread import ProxyReads
from minismtp.session import Session
from minismtp.smtp.protocol import Settings, SmtpServerConnection
from minismtp.stats import PROXY_FAILURES, WorkerStats
from minismtp.timers import Timers
from minismtp.transport import PlainTransport
from minismtp.values import ProxyProtocol
from support import proxyheader

TRUSTED = ProxyProtocol("any", (ipaddress.ip_network("127.0.0.1/32"),))
DST = ("127.0.0.1", 25)
AFTER = b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\n"


class Loop:
    """What ProxyReads uses of the worker: a clock, timers, close()."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers = Timers()
        self.closed: list[tuple[Session, str]] = []

    def close(self, session: Session, reason: str) -> None:
        session.closed = True
        self.closed.append((session, reason))


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    yield ours, theirs
    ours.close()
    theirs.close()


def start(sock: socket.socket, peer: str = "127.0.0.1"):
    loop, poller, stats = Loop(), Poller(), WorkerStats(0)
    reads = ProxyReads(loop, poller, stats)
    session = Session(PlainTransport(sock), SmtpServerConnection(Settings()), Peer(peer, 5555))
    begun: list[Session] = []
    reads.begin(session, TRUSTED, begun.append, 10.0)
    return reads, session, begun, loop, stats


def failures(stats: WorkerStats) -> dict[str, int]:
    return {r: n for r, n in zip(PROXY_FAILURES, stats.proxy_failures) if n}


@pytest.mark.parametrize("header", [
    proxyheader.v1(("198.51.100.9", 40001), DST),
    proxyheader.v2(("198.51.100.9", 40001), DST, [(proxyheader.PP2_TYPE_NOOP, b"xyz")]),
], ids=["v1", "v2"])
@pytest.mark.parametrize("piece", [1, 3, 1000])
def test_header_taken_exactly_in_any_pieces(pair, header, piece):
    ours, theirs = pair
    data = header + AFTER
    sent = min(piece, len(data))
    theirs.sendall(data[:sent])
    reads, session, begun, loop, stats = start(ours)
    while not begun:
        assert not loop.closed and sent < len(data)
        theirs.sendall(data[sent:sent + piece])
        sent += piece
        reads.step(session.preamble)
    theirs.sendall(data[sent:])
    assert begun == [session] and session.preamble is None
    assert session.peer == Peer("198.51.100.9", 40001)
    assert stats.proxy_headers == 1 and not failures(stats)
    assert ours.recv(1000) == AFTER  # nothing past the header was taken


def test_the_poller_is_asked_only_for_a_header_still_on_its_way(pair, monkeypatch):
    """A header that came with the connection is read at once: the poller never hears of
    the connection (the session registers it for itself when it greets). One not there
    yet is watched for, and unwatched when it is in."""
    ours, theirs = pair
    calls: list[str] = []
    monkeypatch.setattr(Poller, "register", lambda self, fd, mask, data: calls.append("register"))
    monkeypatch.setattr(Poller, "unregister", lambda self, fd: calls.append("unregister"))
    header = proxyheader.v2(("198.51.100.9", 40001), DST)
    theirs.sendall(header)
    _, session, begun, _, _ = start(ours)
    assert begun == [session] and calls == []

    later, theirs_later = socket.socketpair()
    later.setblocking(False)
    try:
        reads, session, begun, _, _ = start(later)
        assert begun == [] and calls == ["register"]
        theirs_later.sendall(header)
        reads.step(session.preamble)
        assert begun == [session] and calls == ["register", "unregister"]
    finally:
        later.close()
        theirs_later.close()


def test_local_keeps_the_peer_and_a_step_with_nothing_new_waits(pair):
    ours, theirs = pair
    theirs.sendall(proxyheader.local_v2()[:10])
    reads, session, begun, loop, _ = start(ours)
    reads.step(session.preamble)  # nothing more to read: no harm
    theirs.sendall(proxyheader.local_v2()[10:])
    reads.step(session.preamble)
    assert begun == [session] and session.peer == Peer("127.0.0.1", 5555)


@pytest.mark.parametrize("data, reason", [
    (b"EHLO x\r\n", "not a proxy header"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bad v1 header"),
    (proxyheader.v2_raw(0x21, 0x11, b"", length=9999), "v2 header too long"),
])
def test_failures_close_and_count(pair, data, reason):
    ours, theirs = pair
    theirs.sendall(data)
    _, session, begun, loop, stats = start(ours)
    assert not begun and loop.closed == [(session, "")]
    assert failures(stats) == {reason: 1}
    assert session.end == f"no PROXY header: {reason}"


def test_untrusted_peer_is_not_read(pair):
    ours, theirs = pair
    theirs.sendall(proxyheader.v1(("198.51.100.9", 1), DST))
    _, session, begun, loop, stats = start(ours, peer="127.0.0.2")
    assert not begun and loop.closed and failures(stats) == {"untrusted source": 1}
    assert ours.recv(100).startswith(b"PROXY ")  # left unread


def test_close_mid_header_timeout_and_stopping(pair):
    ours, theirs = pair
    theirs.sendall(b"PROXY TCP4 1.2")
    reads, session, begun, loop, stats = start(ours)
    theirs.shutdown(socket.SHUT_WR)
    reads.step(session.preamble)
    assert failures(stats) == {"closed mid-header": 1} and not begun
    for stopping in (False, True):
        a, b = socket.socketpair()
        with a, b:
            a.setblocking(False)
            reads, session, begun, loop, stats = start(a)
            if stopping:
                reads.wind_down(session)
                assert session.deadline <= 2.0
            reads.expire(session)
            assert failures(stats) == {"stopping" if stopping else "timeout": 1}


def test_remembered_trust_is_per_listener_and_bounded(monkeypatch):
    import minismtp.proxyread as proxyread

    reads = ProxyReads(Loop(), Poller(), WorkerStats(0))
    other = ProxyProtocol("any", (ipaddress.ip_network("10.0.0.0/8"),))
    for _ in range(2):  # the second time from what was remembered
        assert reads._trusted("127.0.0.1", TRUSTED) is True
        assert reads._trusted("127.0.0.1", other) is False
        assert reads._trusted("10.1.2.3", other) is True
    monkeypatch.setattr(proxyread, "_MAX_KNOWN", 8)
    for n in range(50):
        assert reads._trusted(f"192.0.2.{n}", TRUSTED) is False
        assert len(reads._known) <= 8


def test_a_plain_listener_keeps_the_socket_watched_for_the_session(monkeypatch):
    """With hand_over (a plain listener: the greeting comes next, then commands read
    from the same socket), a header that had to be waited for leaves the socket watched,
    now for the session: no unregister, and the session's READ is already in place."""
    calls: list[str] = []
    monkeypatch.setattr(Poller, "register", lambda self, fd, mask, data: calls.append("register"))
    monkeypatch.setattr(Poller, "unregister", lambda self, fd: calls.append("unregister"))
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        loop, poller, stats = Loop(), Poller(), WorkerStats(0)
        reads = ProxyReads(loop, poller, stats)
        session = Session(PlainTransport(ours), SmtpServerConnection(Settings()),
                          Peer("127.0.0.1", 5555))
        begun: list[Session] = []
        reads.begin(session, TRUSTED, begun.append, 10.0, hand_over=True)
        assert calls == ["register"] and begun == []
        theirs.sendall(proxyheader.v2(("198.51.100.9", 40001), DST))
        reads.step(session.preamble)
        assert begun == [session] and calls == ["register"]
        assert poller._owners[session.fd] is session and session.mask == READ
    finally:
        ours.close()
        theirs.close()
