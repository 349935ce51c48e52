"""proxyread.py over a real socket pair, with a stand-in for the loop: the header is taken
exactly, however it arrives, and what follows stays for the next reader: the SMTP core
(its buffer) on a plain listener, OpenSSL (the socket) on an implicit-TLS one."""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import time
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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

LISTENER = types.SimpleNamespace(name="mx")  # what the reader reads of a session's profile

TRUSTED = ProxyProtocol("any", (ipaddress.ip_network("127.0.0.1/32"),))
DST = ("127.0.0.1", 25)
AFTER = b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\n"


class Loop:
    """What ProxyReads uses of the worker: a clock, timers, close(), resume()."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers = Timers()
        self.closed: list[tuple[Session, str]] = []
        self.resumed: list[Session] = []

    def resume(self, session: Session) -> None:
        self.resumed.append(session)

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


def start(sock: socket.socket, peer: str = "127.0.0.1", hand_over: bool = False):
    """Begin reading a header on `sock` (which reads what is there at accept), and step
    once more if it is still awaited (as the poller would: nothing new, no harm)."""
    loop, poller, stats = Loop(), Poller(), WorkerStats(0)
    reads = ProxyReads(loop, poller, stats)
    session = Session(PlainTransport(sock), SmtpServerConnection(Settings()), Peer(peer, 5555),
                      LISTENER)
    begun: list[Session] = []
    reads.begin(session, TRUSTED, begun.append, 10.0, hand_over=hand_over)
    if session.preamble is not None and not loop.closed:
        reads.step(session.preamble)
    return reads, session, begun, loop, stats


def failures(stats: WorkerStats) -> dict[str, int]:
    return {r: n for r, n in zip(PROXY_FAILURES, stats.proxy_failures) if n}


@pytest.mark.parametrize("header", [
    proxyheader.v1(("198.51.100.9", 40001), DST),
    proxyheader.v2(("198.51.100.9", 40001), DST, [(proxyheader.PP2_TYPE_NOOP, b"xyz")]),
    proxyheader.v2(("198.51.100.9", 40001), DST),  # HAProxy's usual: taken in one step
], ids=["v1", "v2", "v2-plain"])
@pytest.mark.parametrize("piece", [1, 3, 1000])
@pytest.mark.parametrize("hand_over", [False, True], ids=["implicit-tls", "plain"])
def test_header_taken_exactly_in_any_pieces(pair, header, piece, hand_over):
    ours, theirs = pair
    data = header + AFTER
    sent = min(piece, len(data))
    theirs.sendall(data[:sent])
    reads, session, begun, loop, stats = start(ours, hand_over=hand_over)
    while not begun:
        assert not loop.closed and sent < len(data)
        theirs.sendall(data[sent:sent + piece])
        sent += piece
        reads.step(session.preamble)
    theirs.sendall(data[sent:])
    assert begun == [session] and session.preamble is None
    assert session.peer == Peer("198.51.100.9", 40001)
    assert stats.proxy_headers == 1 and not failures(stats)
    buffer = session.conn.buffer
    buffered = bytes(buffer.data[buffer.start:buffer.end])
    if hand_over:  # read with the header: the core's, and run on once greeted
        assert loop.resumed == ([session] if buffered else [])
    else:  # OpenSSL's: nothing past the header was taken off the socket
        assert buffered == b"" and loop.resumed == []
    try:
        rest = ours.recv(1000)
    except BlockingIOError:
        rest = b""  # all of it read with the header
    assert buffered + rest == AFTER


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=st.sampled_from([
           proxyheader.v1(("198.51.100.9", 40001), DST),
           proxyheader.v1(None, None),
           proxyheader.v2(("2001:db8::7", 40001), ("2001:db8::1", 25),
                          [(proxyheader.PP2_TYPE_NOOP, b"x" * 300)]),
           proxyheader.v2(("198.51.100.9", 40001), DST),
           proxyheader.local_v2(),
       ]),
       after=st.binary(max_size=600),
       at_accept=st.integers(min_value=0, max_value=700),
       cuts=st.lists(st.integers(min_value=1, max_value=700), max_size=8),
       hand_over=st.booleans())
def test_any_split_of_header_and_what_follows(header, after, at_accept, cuts, hand_over):
    """However the header and the bytes after it arrive (`at_accept` of them there when
    the connection is accepted), the header is taken whole and the rest is left, in order
    and complete, for the next reader: the core's buffer and then the socket (plain), or
    the socket alone (implicit TLS)."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        data = header + after
        sent = min(at_accept, len(data))
        theirs.sendall(data[:sent])
        reads, session, begun, loop, stats = start(ours, hand_over=hand_over)
        for cut in cuts + [len(data)]:
            if begun or sent >= len(data):
                break
            theirs.sendall(data[sent:sent + cut])
            sent += cut
            reads.step(session.preamble)
        assert begun == [session] and not loop.closed and stats.proxy_headers == 1
        theirs.sendall(data[sent:])
        theirs.shutdown(socket.SHUT_WR)
        buffer = session.conn.buffer
        buffered = bytes(buffer.data[buffer.start:buffer.end])
        assert hand_over or not buffered
        assert loop.resumed == ([session] if buffered else [])
        rest = b""
        while chunk := ours.recv(4096):
            rest += chunk
        assert buffered + rest == after
    except BlockingIOError:
        raise AssertionError("the socket lost bytes") from None
    finally:
        ours.close()
        theirs.close()


def begin_watched(sock: socket.socket, monkeypatch, hand_over: bool):
    """Begin reading a header on `sock` (deadline 7 s from 100.0), with the poller's calls
    recorded instead of made: (calls, loop, session, begun, reads)."""
    calls: list[str] = []
    monkeypatch.setattr(Poller, "register", lambda self, fd, mask, data: calls.append("register"))
    monkeypatch.setattr(Poller, "unregister", lambda self, fd: calls.append("unregister"))
    monkeypatch.setattr(Poller, "hand_over", lambda self, fd, owner: calls.append("hand_over"))
    loop = Loop()
    loop.now = 100.0
    reads = ProxyReads(loop, Poller(), WorkerStats(0))
    session = Session(PlainTransport(sock), SmtpServerConnection(Settings()),
                      Peer("127.0.0.1", 5555), LISTENER)
    begun: list[Session] = []
    reads.begin(session, TRUSTED, begun.append, 7.0, hand_over=hand_over)
    return calls, loop, session, begun, reads


@pytest.mark.parametrize("hand_over", [False, True], ids=["implicit-tls", "plain"])
def test_a_header_there_at_accept_is_read_at_once(pair, monkeypatch, hand_over):
    """The listening socket defers accepting until the first bytes are in (listeners.py),
    so a header is read at accept: the session begins in the same turn, without a wake-up.
    On a plain listener the reader never watches the socket, nor sets a deadline: the
    session does both once it has greeted, as on a listener without PROXY. On an
    implicit-TLS listener the socket is watched first, and unwatched once the header is in
    (the handshake watches it its own way)."""
    ours, theirs = pair
    theirs.sendall(proxyheader.v2(("198.51.100.9", 40001), DST))
    calls, _, session, begun, _ = begin_watched(ours, monkeypatch, hand_over)
    assert begun == [session] and session.preamble is None
    assert session.peer == Peer("198.51.100.9", 40001)
    assert calls == ([] if hand_over else ["register", "unregister"])
    assert session.mask == 0
    assert session.deadline == (0.0 if hand_over else 107.0)
    buffer = session.conn.buffer
    assert buffer.start == buffer.end  # the header is consumed: nothing left for the core


@pytest.mark.parametrize("after", [b"", AFTER], ids=["alone", "client-spoke-early"])
def test_the_client_behind_the_balancer_is_logged_at_debug(pair, caplog, after):
    """One debug line per header names the balancer and the client, whichever way the
    header was taken (in one step, alone; the general way, with early client bytes)."""
    ours, theirs = pair
    theirs.sendall(proxyheader.v2(("198.51.100.9", 40001), DST) + after)
    with caplog.at_level(logging.DEBUG, logger="minismtp.worker"):
        _, session, begun, _, _ = start(ours, hand_over=True)
    assert begun == [session]
    assert [r.getMessage() for r in caplog.records] == [
        "proxy: peer=127.0.0.1 is 198.51.100.9:40001 (v2)"]


def test_a_listener_for_version_1_refuses_haproxys_usual_v2_header(pair):
    ours, theirs = pair
    theirs.sendall(proxyheader.v2(("198.51.100.9", 40001), DST))
    loop, stats = Loop(), WorkerStats(0)
    session = Session(PlainTransport(ours), SmtpServerConnection(Settings()),
                      Peer("127.0.0.1", 5555), LISTENER)
    begun: list[Session] = []
    v1_only = ProxyProtocol("v1", TRUSTED.trusted)
    ProxyReads(loop, Poller(), stats).begin(session, v1_only, begun.append, 10.0,
                                             hand_over=True)
    assert not begun and loop.closed == [(session, "")]
    assert failures(stats) == {"unsupported version": 1}
    assert session.peer == Peer("127.0.0.1", 5555)


@pytest.mark.parametrize("hand_over", [False, True], ids=["implicit-tls", "plain"])
def test_a_header_not_there_at_accept_is_waited_for_with_its_deadline(pair, monkeypatch,
                                                                       hand_over):
    """The kernel's deferral over, or a peer that sends its header in pieces: the socket
    is watched with the header's deadline, and read when the poller says so."""
    ours, theirs = pair
    header = proxyheader.v2(("198.51.100.9", 40001), DST)
    theirs.sendall(header[:5])
    calls, loop, session, begun, reads = begin_watched(ours, monkeypatch, hand_over)
    assert begun == [] and calls == ["register"] and session.deadline == 107.0
    assert session.preamble is not None and not loop.closed
    theirs.sendall(header[5:])
    reads.step(session.preamble)
    assert begun == [session]
    assert calls == ["register", "hand_over" if hand_over else "unregister"]
    assert session.mask == (READ if hand_over else 0)


@pytest.mark.parametrize("hand_over", [False, True], ids=["implicit-tls", "plain"])
def test_local_keeps_the_peer_and_a_step_with_nothing_new_waits(pair, hand_over):
    ours, theirs = pair
    theirs.sendall(proxyheader.local_v2()[:10])
    reads, session, begun, loop, _ = start(ours, hand_over=hand_over)
    reads.step(session.preamble)  # nothing more to read: no harm
    theirs.sendall(proxyheader.local_v2()[10:])
    reads.step(session.preamble)
    assert begun == [session] and session.peer == Peer("127.0.0.1", 5555)


@pytest.mark.parametrize("data, reason", [
    (b"EHLO x\r\n", "not a proxy header"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bad v1 header"),
    (proxyheader.v2_raw(0x21, 0x11, b"", length=9999), "v2 header too long"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2" + b" " * 3000, "bad v1 header"),
    (b"PROXY UNKNOWN " + b"x" * 3000, "v1 header too long"),
], ids=["smtp", "bare-lf", "v2-long", "v1-spaces", "v1-long"])
@pytest.mark.parametrize("hand_over", [False, True], ids=["implicit-tls", "plain"])
def test_failures_close_and_count(pair, data, reason, hand_over):
    ours, theirs = pair
    theirs.sendall(data)
    _, session, begun, loop, stats = start(ours, hand_over=hand_over)
    assert not begun and loop.closed == [(session, "")]
    assert failures(stats) == {reason: 1}
    assert session.end == f"no PROXY header: {reason}"


def test_untrusted_peer_is_not_read(pair):
    ours, theirs = pair
    theirs.sendall(proxyheader.v1(("198.51.100.9", 1), DST))
    _, session, begun, loop, stats = start(ours, peer="127.0.0.2")
    assert not begun and loop.closed and failures(stats) == {"untrusted source": 1}
    assert ours.recv(100).startswith(b"PROXY ")  # left unread


@pytest.mark.parametrize("hand_over", [False, True], ids=["implicit-tls", "plain"])
@pytest.mark.parametrize("how", ["eof", "reset"])
def test_closed_or_reset_mid_header(hand_over, how):
    """The peer goes away after part of a header: an end of stream, or a reset (which
    makes the read raise): closed and counted the same way on both listener kinds."""
    listener = socket.create_server(("127.0.0.1", 0))
    theirs = socket.create_connection(listener.getsockname())
    ours, _ = listener.accept()
    listener.close()
    ours.setblocking(False)
    try:
        theirs.sendall(b"PROXY TCP4 1.2")
        reads, session, begun, loop, stats = start(ours, hand_over=hand_over)
        assert not begun and not loop.closed
        if how == "eof":
            theirs.shutdown(socket.SHUT_WR)
        else:  # SO_LINGER 0: close sends RST
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            theirs.close()
        time.sleep(0.05)  # loopback delivers at once; a margin for a loaded machine
        reads.step(session.preamble)
        assert failures(stats) == {"closed mid-header": 1} and not begun
        assert loop.closed == [(session, "")]
    finally:
        ours.close()
        theirs.close()


def test_timeout_and_stopping():
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
                          Peer("127.0.0.1", 5555), LISTENER)
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
