"""TLS handshakes that go wrong on a real server: each ends its own connection with a log
line and a counter labelled from the fixed set, and the worker keeps serving (same pids,
a normal session afterwards). Also: slow and stalled handshakes, a flood after TLS, and
a graceful stop while a handshake is in progress."""

from __future__ import annotations

import re
import signal
import socket
import ssl
import struct
import threading
import time
import warnings

import pytest

pytest.importorskip("trustme")

from minismtp.smtp import replies  # noqa: E402
from minismtp.stats import HANDSHAKE_FAILURES  # noqa: E402
from support.tlsserver import (  # noqa: E402
    HOST, NAME, client_hello, failures_key, free_ports, metrics, start_tls, tls_overrides,
    wait_for_metric,
)

FAILED = r"TLS handshake failed: peer=127\.0\.0\.1 listener=\S+ reason=([a-z ]+)$"


@pytest.fixture
def both(make_server, tls_files):
    """One worker; an implicit-TLS listener (server.port) and a STARTTLS one."""
    implicit, starttls = free_ports(2)
    server = make_server(tls_overrides(
        *tls_files,
        [{"address": f"{HOST}:{implicit}", "tls": "implicit"},
         {"address": f"{HOST}:{starttls}", "tls": "starttls"}],
        limits={"tls_handshake_timeout": "1s", "max_junk_commands": 10000}))
    server.starttls_port = starttls
    server.pids = server.worker_pids()
    return server


def implicit_session(server, pki) -> None:
    """A normal session on the implicit listener: greeting, EHLO, NOOP, QUIT."""
    with socket.create_connection((HOST, server.port), timeout=10) as raw:
        with pki.client_context().wrap_socket(raw, server_hostname=NAME) as sock:
            assert sock.recv(512).startswith(b"220 ")
            sock.sendall(b"NOOP\r\nQUIT\r\n")
            data = b""
            while data.count(b"\r\n") < 2:
                piece = sock.recv(512)
                assert piece, data
                data += piece
            assert data == replies.OK.wire + replies.CLOSING.wire


def failed_with(server, mark: int, expected: str | None = None) -> str:
    """The reason of the one handshake failure logged since `mark`; its counter shows 1."""
    reason = server.wait_for_log(FAILED, since=mark).group(1)
    assert reason in HANDSHAKE_FAILURES and reason != "other", reason
    if expected is not None:
        assert reason == expected
    wait_for_metric(server, failures_key(reason), 1)
    return reason


def still_serving(server, pki) -> None:
    implicit_session(server, pki)
    assert server.worker_pids() == server.pids
    assert "Traceback" not in server.log_text()


def test_plaintext_smtp_on_the_implicit_port(both, raw_clients, pki):
    mark = both.mark()
    client = raw_clients(both.port)
    client.send(b"EHLO x\r\n")
    assert b"220" not in client.wait_closed()  # at most a TLS alert, never SMTP
    failed_with(both, mark, "wrong version number")
    still_serving(both, pki)


@pytest.mark.parametrize("request_line", [b"GET / HTTP/1.0", b"CONNECT mx.test:25 HTTP/1.1"])
def test_http_request_on_the_implicit_port(both, raw_clients, pki, request_line):
    mark = both.mark()
    client = raw_clients(both.port)
    client.send(request_line + b"\r\n\r\n")
    assert b"220" not in client.wait_closed()
    failed_with(both, mark, "http request")
    still_serving(both, pki)


def test_client_hello_on_the_starttls_port_before_starttls(both, raw_clients, pki):
    hello = client_hello(pki.client_context())
    client = raw_clients(both.starttls_port)
    client.expect(220)
    codes = []
    for _ in range(50):  # bounded: max_errors closes well before
        try:
            client.send(hello + b"\r\n")
            codes.append(client.reply(timeout=5).code)
        except (ConnectionError, OSError):
            break
        if codes[-1] == 421:
            break
    assert codes and codes[-1] == 421 and all(code // 100 == 5 for code in codes[:-1]), codes
    client.wait_closed()
    assert metrics(both)["minismtp_tls_sessions_total"] == 0
    still_serving(both, pki)


def test_stalled_handshake_is_closed_at_its_deadline(both, raw_clients, pki):
    mark = both.mark()
    client = raw_clients(both.port)
    client.send(client_hello(pki.client_context())[:20])
    started = time.monotonic()
    client.wait_closed(timeout=10)
    took = time.monotonic() - started
    assert 0.5 < took < 8, took  # limits.tls_handshake_timeout: 1s, checked once a second
    failed_with(both, mark, "timeout")
    still_serving(both, pki)


def test_handshake_one_byte_at_a_time(both, pki):
    """A real client handshake whose every byte travels in a segment of its own."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = pki.client_context().wrap_bio(incoming, outgoing, server_hostname=NAME)
    with socket.create_connection((HOST, both.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def pump(done) -> None:
            for _ in range(2000):
                try:
                    result = done()
                except ssl.SSLWantReadError:
                    result = None
                for byte in outgoing.read():
                    sock.sendall(bytes([byte]))
                    time.sleep(0.0005)
                if result is not None:
                    return result
                data = sock.recv(65536)
                assert data, "server closed"
                incoming.write(data)
            raise AssertionError("no progress")

        pump(lambda: tls.do_handshake() or True)
        assert tls.version() == "TLSv1.3"
        assert pump(lambda: tls.read(512)).startswith(b"220 ")
        tls.write(b"EHLO slow.test\r\n")
        assert pump(lambda: tls.read(4096)).startswith(b"250-")
    assert wait_for_metric(both, "minismtp_tls_sessions_total", 1)
    still_serving(both, pki)


@pytest.mark.parametrize("how, expected", [("close", "unexpected eof"),
                                           ("reset", "connection reset")])
def test_client_vanishing_mid_handshake(both, pki, how, expected):
    mark = both.mark()
    sock = socket.create_connection((HOST, both.port), timeout=10)
    sock.sendall(client_hello(pki.client_context())[:40])
    time.sleep(0.2)  # the server has read and waits for the rest
    if how == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    failed_with(both, mark, expected)
    still_serving(both, pki)


def _old_client(maximum: ssl.TLSVersion) -> ssl.SSLContext:
    """A client that offers nothing newer than `maximum` (no verification: it never gets
    that far). TLS 1.0 and 1.1 need security level 0 to be offered at all."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if maximum < ssl.TLSVersion.TLSv1_2:
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
        context.maximum_version = maximum
    return context


@pytest.mark.parametrize("server_min, client_max", [
    ("TLSv1.2", ssl.TLSVersion.TLSv1_1), ("TLSv1.3", ssl.TLSVersion.TLSv1_2)])
def test_client_below_the_minimum_version(make_server, pki, tls_files, server_min,
                                          client_max):
    server = make_server(tls_overrides(*tls_files, [{"address": f"{HOST}:0",
                                                     "tls": "implicit"}],
                                       tls={"min_version": server_min}))
    mark = server.mark()
    with socket.create_connection((HOST, server.port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            _old_client(client_max).wrap_socket(raw, server_hostname=NAME)
    failed_with(server, mark, "unsupported protocol")


def test_flood_without_a_newline_after_tls(both, raw_clients, pki):
    client = raw_clients(both.starttls_port)
    client.hello()
    client.cmd("STARTTLS", 220)
    start_tls(client, pki.client_context())
    client.cmd("EHLO client.test", 250)
    [pid] = both.pids
    before = both.rss_kib(pid)
    chunk = b"x" * 65536
    for _ in range(16):  # 1 MiB
        client.send(chunk)
    assert client.reply().raw == replies.LINE_TOO_LONG.wire
    client.send(b"\r\n")
    assert client.cmd("NOOP", 250).raw == replies.OK.wire
    assert client.send_message(b"Subject: after\r\n\r\nok\r\n").code == 250
    assert both.rss_kib(pid) - before < 4096, (before, both.rss_kib(pid))
    still_serving(both, pki)


def test_sigterm_during_a_handshake_exits_cleanly(both, pki):
    mark = both.mark()
    sock = socket.create_connection((HOST, both.port), timeout=10)
    try:
        sock.sendall(client_hello(pki.client_context())[:20])
        time.sleep(0.2)
        both.send_signal(signal.SIGTERM)
        assert both.wait(15) == 0
    finally:
        sock.close()
    both.wait_for_log(r"master exiting", since=mark)
    assert "Traceback" not in both.log_text()
    assert re.search(FAILED.replace("([a-z ]+)", "(stopping|timeout)"), both.log_text(mark),
                     re.M)


@pytest.mark.parametrize("mode", ["implicit", "starttls"])
def test_handshake_in_progress_at_sigterm_finishes_then_421(both, raw_clients, pki, mode):
    """A stopping worker (SIGTERM; a reload retires workers the same way) lets a handshake
    in progress finish and turns the session away with 421 under TLS; it does not cut
    the handshake."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = pki.client_context().wrap_bio(incoming, outgoing, server_hostname=NAME)
    client = raw_clients(both.port if mode == "implicit" else both.starttls_port)
    if mode == "starttls":
        client.hello()
        client.cmd("STARTTLS", 220)
    sock = client.sock

    def step(call):
        try:
            return call()
        except ssl.SSLWantReadError:
            return None
        finally:
            sock.sendall(outgoing.read())

    assert step(tls.do_handshake) is None  # the ClientHello goes out
    data = sock.recv(65536)  # the server's flight: it waits for our Finished now
    assert data[:1] == b"\x16"
    mark = both.mark()
    both.send_signal(signal.SIGTERM)
    both.wait_for_log(r"stopping: workers finish", since=mark)
    time.sleep(0.3)  # the worker has the signal too
    incoming.write(data)
    for _ in range(50):
        if step(tls.do_handshake) is not None or tls.version():
            break
        incoming.write(sock.recv(65536))
    got = b""
    for _ in range(50):
        got += step(lambda: tls.read(4096)) or b""
        if got.endswith(b"\r\n"):
            break
        more = sock.recv(65536)
        assert more, f"closed after {got!r}"
        incoming.write(more)
    assert got == replies.SHUTTING_DOWN.wire
    assert both.wait(15) == 0
    assert "TLS handshake failed" not in both.log_text(mark)


def test_implicit_port_at_max_connections_closes_without_plaintext(make_server, pki,
                                                                   tls_files):
    """At server.max_connections a plain listener answers 421 and closes; on an implicit
    TLS port a plaintext reply would only be garbage to the client's handshake."""
    server = make_server(tls_overrides(*tls_files, [{"address": f"{HOST}:0",
                                                     "tls": "implicit"}],
                                       server={"max_connections": 1}))
    context = pki.client_context()
    with socket.create_connection((HOST, server.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=NAME) as held:
            assert held.recv(512).startswith(b"220 ")
            with socket.create_connection((HOST, server.port), timeout=10) as second:
                second.sendall(client_hello(context))
                rest = b""
                for _ in range(100):
                    try:
                        piece = second.recv(4096)
                    except ConnectionResetError:  # closed with the hello unread
                        break
                    if not piece:
                        break
                    rest += piece
                assert rest == b""


def test_replies_to_a_client_that_does_not_read_arrive_whole(both, raw_clients, pki):
    """Pipelined commands whose replies outrun the client's receive window: TLS writes
    block (SSL_write wants to write) and are retried with more replies after them."""
    client = raw_clients(both.starttls_port)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.hello()
    client.cmd("STARTTLS", 220)
    start_tls(client, pki.client_context())
    count = 3000
    block = b"EHLO client.test\r\nRSET\r\n" * (count // 2)
    sender = threading.Thread(target=client.send, args=(block + b"QUIT\r\n",), daemon=True)
    sender.start()
    time.sleep(0.5)  # replies pile up on the server meanwhile
    ehlo = client.reply()
    assert ehlo.code == 250 and len(ehlo.lines) > 3
    for n in range(1, count):
        reply = client.reply()
        assert reply.raw == (ehlo.raw if n % 2 == 0 else replies.OK.wire), (n, reply)
    assert client.reply().raw == replies.CLOSING.wire
    sender.join(10)


def test_an_http_request_over_implicit_tls_is_closed_before_any_smtp(both, pki):
    """A browser made to post to the implicit-TLS port (cross-protocol, ALPACA): the
    request line gets 221 and the close, so the SMTP in the request's body stores
    nothing."""
    context = pki.client_context()
    context.set_alpn_protocols(["http/1.1"])
    body = (b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@mx.test>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nhi\r\n.\r\nQUIT\r\n")
    request = (b"POST /form HTTP/1.1\r\nHost: www.example.org\r\nContent-Type: text/plain\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body)) + body
    with socket.create_connection((HOST, both.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=NAME) as sock:
            sock.sendall(request)
            data = b""
            while piece := sock.recv(4096):
                data += piece
    assert data.startswith(b"220 ") and data.endswith(replies.NOT_SMTP.wire), data
    assert data.count(b"\r\n") == 2, data  # the greeting and the 221: nothing in between
    line = both.wait_for_log(r"disconnect from 127\.0\.0\.1:\d+ .*").group(0)
    assert line.endswith("end=refused: not SMTP (the client sent a HTTP request)"), line
    assert both.maildir_messages() == []
    still_serving(both, pki)
