"""TlsTransport over real TCP connections on 127.0.0.1, with trustme certificates.

Both ends are non-blocking and driven step by step from the test's own thread: the
server through TlsTransport, the client through the ssl module (an SSLSocket, or an
SSLObject over memory BIOs where the test needs to choose what goes on the wire).
Every wait is a select() with a timeout, every loop bounded.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import types

import pytest

trustme = pytest.importorskip("trustme")

from minismtp.loop import READ, WRITE  # noqa: E402
from minismtp.output import Output, TarpitSpan  # noqa: E402
from minismtp.tls import describe  # noqa: E402
from minismtp.timers import Timers  # noqa: E402
from minismtp.tlstransport import HandshakeFailed, TlsTransport  # noqa: E402
from minismtp.transport import PlainTransport  # noqa: E402

STEPS = 400  # bound on every pumping loop
WAIT_S = 0.05  # per select() in those loops
HOST = "mx.test"


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def server_context(ca):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(HOST).configure_cert(context)
    return context


@pytest.fixture(scope="module")
def client_context(ca):
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def tcp():
    """A connected (server, client) pair of non-blocking TCP sockets on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=5)
        server, _ = listener.accept()
    server.setblocking(False)
    client.setblocking(False)
    yield server, client
    server.close()
    client.close()


def wait(sock_or_fd, mask: int) -> None:
    r = [sock_or_fd] if mask & READ else []
    w = [sock_or_fd] if mask & WRITE else []
    select.select(r, w, [], WAIT_S)


def handshake_failure(server: TlsTransport) -> HandshakeFailed:
    """Drive the server's handshake on what the client sent until it fails."""
    with pytest.raises(HandshakeFailed) as failed:
        for _ in range(STEPS):
            wait(server, READ)
            server.handshake()
    return failed.value


def client_step(client: ssl.SSLSocket) -> bool:
    try:
        client.do_handshake()
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return False
    return True


def handshake(server: TlsTransport, client: ssl.SSLSocket) -> list[int]:
    """Drive both ends to completion; return what the server waited for, step by step."""
    waits: list[int] = []
    client_done = server_done = False
    for _ in range(STEPS):
        client_done = client_done or client_step(client)
        if not server_done:
            server_done = server.handshake()
            if not server_done:
                waits.append(server.handshake_wants)
                wait(server, server.handshake_wants)
        if client_done and server_done:
            return waits
    raise AssertionError("handshake did not complete")


def connect(tcp, server_context, client_context, **client_options):
    server_sock, client_sock = tcp
    for name, value in client_options.items():
        setattr(client_context, name, value)
    server = TlsTransport.wrap(server_sock, server_context)
    client = client_context.wrap_socket(client_sock, server_hostname=HOST,
                                        do_handshake_on_connect=False,
                                        suppress_ragged_eofs=False)
    return server, client


def recv_all(client: ssl.SSLSocket, size: int) -> bytes:
    got = bytearray()
    for _ in range(STEPS * 10):
        try:
            chunk = client.recv(65536)
        except ssl.SSLWantReadError:
            wait(client, READ)
            continue
        if not chunk:
            break
        got += chunk
        if len(got) >= size:
            break
    return bytes(got)


def read_all(server: TlsTransport, size: int, view_bytes: int = 65536) -> bytes:
    buffer = bytearray(view_bytes)
    view = memoryview(buffer)
    got = bytearray()
    for _ in range(STEPS * 10):
        try:
            n = server.read_into(view)
        except BlockingIOError:
            assert server.read_wants in (READ, WRITE)
            wait(server, server.read_wants)
            continue
        if n == 0:
            break
        got += view[:n]
        if len(got) >= size:
            break
    return bytes(got)


@pytest.fixture(params=["TLSv1_2", "TLSv1_3"])
def version(request):
    return getattr(ssl.TLSVersion, request.param)


@pytest.fixture
def client_context_fresh(ca):
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def test_handshake_and_exchange(tcp, server_context, client_context_fresh, version):
    server, client = connect(tcp, server_context, client_context_fresh,
                             minimum_version=version, maximum_version=version)
    waits = handshake(server, client)
    assert waits and waits[0] == READ  # the client speaks first
    assert server.sock.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2",
                                     ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
    text = describe(server.sock)
    name, _, bits = server.sock.cipher()
    assert text == f"{server.sock.version()} with cipher {name} ({bits}/{bits} bits)"
    assert server.write(b"220 ready\r\n", socket.MSG_DONTWAIT) == 11  # flags ignored
    assert recv_all(client, 11) == b"220 ready\r\n"
    client.sendall(b"EHLO x\r\n")
    assert read_all(server, 8) == b"EHLO x\r\n"


def test_handshake_a_byte_at_a_time(tcp, server_context, client_context):
    """The client's flights reach the server one byte per segment: each step until the
    last byte wants READ, and the handshake completes all the same."""
    server_sock, client_sock = tcp
    server = TlsTransport.wrap(server_sock, server_context)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(incoming, outgoing, server_hostname=HOST)
    client_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server_done = client_done = False
    steps = 0
    for _ in range(STEPS):
        try:
            client.do_handshake()
            client_done = True
        except ssl.SSLWantReadError:
            pass
        for byte in outgoing.read():
            client_sock.send(bytes([byte]))
            steps += 1
            if not server_done:
                wait(server, READ)
                server_done = server.handshake()
                if not server_done:
                    assert server.handshake_wants == READ
        if not server_done:
            server_done = server.handshake()
        wait(client_sock, READ)
        try:
            data = client_sock.recv(65536)
        except BlockingIOError:
            data = b""
        if data:
            incoming.write(data)
        if client_done and server_done:
            break
    assert client_done and server_done
    assert steps > 100  # a ClientHello alone is a few hundred bytes


def test_client_vanishing_mid_handshake(tcp, server_context, client_context):
    server_sock, client_sock = tcp
    server = TlsTransport.wrap(server_sock, server_context)
    outgoing = ssl.MemoryBIO()
    client = client_context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=HOST)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    hello = outgoing.read()
    client_sock.sendall(hello[:len(hello) // 2])
    wait(server, READ)
    assert server.handshake() is False and server.handshake_wants == READ
    client_sock.close()
    failed = handshake_failure(server)
    assert failed.reason == "unexpected eof"


def test_client_closing_before_a_word(tcp, server_context):
    server_sock, client_sock = tcp
    server = TlsTransport.wrap(server_sock, server_context)
    client_sock.close()
    failed = handshake_failure(server)
    assert failed.reason == "unexpected eof"


@pytest.mark.parametrize("garbage, reason", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "http request"),
    (b"EHLO client.example\r\n", "wrong version number"),
])
def test_plaintext_on_the_tls_side(tcp, server_context, garbage, reason):
    server_sock, client_sock = tcp
    server = TlsTransport.wrap(server_sock, server_context)
    client_sock.sendall(garbage)
    failed = handshake_failure(server)
    assert failed.reason == reason


def test_no_shared_cipher(tcp, server_context, client_context_fresh):
    # trustme's certificates are ECDSA: an RSA-only TLS 1.2 client finds nothing to share.
    client_context_fresh.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    server, client = connect(tcp, server_context, client_context_fresh,
                             maximum_version=ssl.TLSVersion.TLSv1_2)
    with pytest.raises(HandshakeFailed) as failed:
        for _ in range(STEPS):
            try:
                client_step(client)
            except ssl.SSLError:
                pass
            if server.handshake():
                break
            wait(server, server.handshake_wants)
    assert failed.value.reason == "no shared cipher"


def test_large_transfer_both_ways(tcp, server_context, client_context):
    server, client = connect(tcp, server_context, client_context)
    handshake(server, client)
    body = bytes(range(256)) * 16384  # 4 MiB, more than any socket buffer
    # client -> server: read_into a view much smaller than the records
    sent = 0
    received = bytearray()
    view = memoryview(bytearray(1000))
    for _ in range(STEPS * 100):
        if sent < len(body):
            try:
                sent += client.send(body[sent:sent + 65536])
            except ssl.SSLWantWriteError:
                pass
        try:
            n = server.read_into(view)
            received += view[:n]
        except BlockingIOError:
            wait(server, server.read_wants)
        if len(received) == len(body):
            break
    assert bytes(received) == body
    # server -> client: the client does not read, so a write must block at some point;
    # the retry passes the same bytes (plus more) and the client gets each byte once.
    out = body
    blocked = False
    for _ in range(64):
        try:
            n = server.write(out)
        except BlockingIOError:
            assert server.write_wants == WRITE
            blocked = True
            break
        assert n == len(out)  # never partial: all or BlockingIOError
    assert blocked
    got = bytearray()
    extra = b"250 more\r\n"
    retry = out + extra
    for _ in range(STEPS * 100):
        try:
            got += client.recv(1 << 20)
        except ssl.SSLWantReadError:
            pass
        if retry:
            try:
                assert server.write(retry) == len(retry)
                retry = b""
            except BlockingIOError:
                wait(server, server.write_wants)
        if not retry and got.endswith(extra):
            break
    assert got.endswith(out + extra)
    assert len(got) % len(body) == len(extra)  # whole earlier copies, then the retry once


def test_has_buffered_input_while_a_record_is_only_partly_read(tcp, server_context,
                                                                client_context):
    server, client = connect(tcp, server_context, client_context)
    handshake(server, client)
    client.sendall(b"x" * 10000)  # one record
    view = memoryview(bytearray(100))
    for _ in range(STEPS):
        try:
            n = server.read_into(view)
            break
        except BlockingIOError:
            wait(server, server.read_wants)
    assert n == 100
    assert server.has_buffered_input  # select() would not say so: the kernel has nothing
    assert select.select([server], [], [], 0)[0] == []
    total = n
    while server.has_buffered_input:
        total += server.read_into(view)
    assert total == 10000 and not server.has_buffered_input


def test_close_sends_close_notify(tcp, server_context, client_context):
    server, client = connect(tcp, server_context, client_context)
    handshake(server, client)
    server.close()
    for _ in range(STEPS):
        try:
            assert client.recv(100) == b""  # a clean end: a ragged one would raise
            break
        except ssl.SSLWantReadError:
            wait(client, READ)
    else:
        raise AssertionError("no close_notify")


def test_client_close_reads_as_end_of_stream(tcp, server_context, client_context):
    server, client = connect(tcp, server_context, client_context)
    handshake(server, client)
    client.sendall(b"QUIT\r\n")
    client.close()  # no close_notify: a FIN alone still ends the stream
    assert read_all(server, 100) == b"QUIT\r\n"


def test_shutdown_write_then_drain(tcp, server_context, client_context):
    server, client = connect(tcp, server_context, client_context)
    handshake(server, client)
    assert server.shutdown_write()
    assert recv_all(client, 1) == b""  # close_notify, then FIN
    client.sendall(b"NOOP\r\n" * 10)
    client.close()
    for _ in range(STEPS):
        if server.discard_input():
            break
        wait(server, READ)
    else:
        raise AssertionError("drain did not end")


def test_start_tls_switches_the_same_connection(tcp, server_context, client_context):
    server_sock, client_sock = tcp
    plain = PlainTransport(server_sock)
    assert (plain.read_wants, plain.write_wants, plain.has_buffered_input) == (READ, WRITE, False)
    fd = plain.fileno()
    plain.write(b"220 2.0.0 Ready to start TLS\r\n", 0)
    plain.pending = b"x"
    with pytest.raises(RuntimeError):
        plain.start_tls(server_context)
    plain.pending = b""
    server = plain.start_tls(server_context)
    assert server.fileno() == fd and plain.fileno() == -1
    client_sock.setblocking(True)
    assert client_sock.recv(100) == b"220 2.0.0 Ready to start TLS\r\n"
    client_sock.setblocking(False)
    client = client_context.wrap_socket(client_sock, server_hostname=HOST,
                                        do_handshake_on_connect=False)
    handshake(server, client)
    client.sendall(b"EHLO x\r\n")
    assert read_all(server, 8) == b"EHLO x\r\n"


def test_refuse_only_closes(tcp, server_context):
    server_sock, client_sock = tcp
    server = TlsTransport.wrap(server_sock, server_context)
    server.refuse(b"421 4.3.2 busy\r\n")
    client_sock.setblocking(True)
    client_sock.settimeout(5)
    assert client_sock.recv(100) == b""


class TarpitLoop:
    """What output.py's tarpit uses of the worker's loop."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers = Timers()
        self.closed: list[str] = []
        self.resumed = 0

    def want(self, session, mask: int) -> None:
        session.mask = mask

    def close(self, session, reason: str) -> None:
        session.closed = True
        self.closed.append(reason)

    def resume(self, session) -> None:
        self.resumed += 1


class CountedWrites(TlsTransport):
    __slots__ = ("lengths",)  # of each write asked for, blocked or not

    def write(self, data, flags=0):
        self.lengths.append(len(data))
        return super().write(data, flags)


def test_a_tarpit_retries_a_blocked_write_whole_then_goes_on_step_by_step(
        tcp, server_context, client_context):
    """The replies before a tarpitted one go out at full speed, with its first piece;
    when the socket does not take them, OpenSSL has made records of part of them already
    and refuses a retry with fewer bytes ("bad length"): the tarpit's next steps retry
    them all, then go on a piece at a time."""
    server_sock, client_sock = tcp
    server = CountedWrites(server_context.wrap_socket(server_sock, server_side=True,
                                                      do_handshake_on_connect=False))
    server.lengths = []
    client = client_context.wrap_socket(client_sock, server_hostname=HOST,
                                        do_handshake_on_connect=False)
    handshake(server, client)
    server.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    before = bytes(range(256)) * 4096  # 1 MiB of replies to pipelined commands
    tarpitted = b"250 2.1.0 Ok\r\n"
    loop = TarpitLoop()
    span = TarpitSpan(len(before), 20.0)
    span.end = len(before) + len(tarpitted)
    session = types.SimpleNamespace(
        transport=server, mask=READ, closed=False, paused=False, trickling=False,
        tarpits=[span], conn=types.SimpleNamespace(state=None, data_to_send=bytes))
    server.pending = before + tarpitted
    Output(loop)._start_trickle(session)
    assert loop.closed == [] and session.trickling
    first = len(before) + 2  # and the tarpitted reply's first step (20 B/s, 0.1 s)
    assert server.lengths == [first]  # blocked
    assert server.write_retry_bytes == first
    got = bytearray()
    for _ in range(STEPS * 10):
        try:
            got += client.recv(1 << 20)
        except ssl.SSLWantReadError:
            wait(client, READ)
        loop.now = loop.timers.next_due()  # the next step, on time
        loop.timers.expire(loop.now, lambda owner: None)
        if not session.trickling:
            break
    got += recv_all(client, len(before) + len(tarpitted) - len(got))
    assert loop.closed == [] and loop.resumed == 1
    assert bytes(got) == before + tarpitted
    blocked = server.lengths.index(2) - 1  # the last retry of the whole: it went out
    assert set(server.lengths[:blocked + 1]) == {first}
    assert server.lengths[blocked + 1:] == [2] * (len(tarpitted) // 2 - 1)
    assert server.write_retry_bytes == 0


def test_a_plain_peer_is_gone_only_when_its_end_of_stream_is_all_that_is_left(tcp):
    """Nothing sent yet: there. A command then a half-close: there (it may still read
    the answer), until the command is read. A reset: gone."""
    server_sock, client_sock = tcp
    plain = PlainTransport(server_sock)
    assert not plain.peer_gone()
    client_sock.send(b"QUIT\r\n")
    client_sock.shutdown(socket.SHUT_WR)
    wait(server_sock, READ)
    assert not plain.peer_gone()
    assert server_sock.recv(100) == b"QUIT\r\n"
    assert plain.peer_gone()
    assert not plain.peer_gone(reset_only=True)  # it may be waiting for an answer


def test_a_plain_peer_that_reset_is_gone(tcp):
    server_sock, client_sock = tcp
    client_sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client_sock.close()  # RST
    wait(server_sock, READ)
    assert PlainTransport(server_sock).peer_gone(reset_only=True)  # the reset, once


def test_a_tls_peer_is_gone_only_when_nothing_is_left_to_read(
        tcp, server_context, client_context):
    """Records on the socket, or bytes decrypted inside OpenSSL: there. The socket closed
    (a FIN, no close_notify: what a client's close() sends) with nothing before it: gone."""
    server_sock, client_sock = tcp
    server = TlsTransport.wrap(server_sock, server_context)
    client = client_context.wrap_socket(client_sock, server_hostname=HOST,
                                        do_handshake_on_connect=False)
    handshake(server, client)
    assert not server.peer_gone()
    client.sendall(b"NOOP\r\n" * 4)
    wait(server, READ)
    assert not server.peer_gone()  # a record, not decrypted yet
    view = memoryview(bytearray(6))
    assert server.read_into(view) == 6  # a command; the rest waits inside OpenSSL
    client.close()
    assert not server.peer_gone()
    assert read_all(server, 18) == b"NOOP\r\n" * 3
    wait(server, READ)  # the FIN
    assert server.peer_gone()
