"""The TLS building blocks put together the way the worker's loop will call them:
PlainTransport, the core, StartTls, start_tls(), handshake(), tls_started(), and an
implicit TLS session, against smtplib and a raw socket on 127.0.0.1.

`serve()` below is a reference for the wiring: the order of calls, and what to select on
during the handshake. The server runs in the test's thread, the client in another; every
wait is bounded.
"""

from __future__ import annotations

import select
import smtplib
import socket
import ssl
import threading

import pytest

trustme = pytest.importorskip("trustme")

from minismtp import tls  # noqa: E402
from minismtp.config import (  # noqa: E402
    CertificatePair, ListenAddress, Listener, TlsConfig, load_config,
)
from minismtp.loop import READ, WRITE  # noqa: E402
from minismtp.session import protocol_settings  # noqa: E402
from minismtp.smtp.events import (  # noqa: E402
    NEED_DATA, PAUSED, BodyChunk, ConnectionClosed, DataStarted, MessageEnd,
)
from minismtp.smtp.protocol import SmtpServerConnection  # noqa: E402
from minismtp.tlstransport import TlsTransport  # noqa: E402
from minismtp.transport import PlainTransport  # noqa: E402

STEPS = 2000
WAIT_S = 0.05


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def context(ca, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("mx.test", "127.0.0.1")  # smtplib checks the address it dialled
    cert.cert_chain_pems[0].write_to_path(str(directory / "c.pem"))
    cert.private_key_pem.write_to_path(str(directory / "k.pem"))
    return tls.server_context(TlsConfig((CertificatePair(str(directory / "c.pem"),
                                                         str(directory / "k.pem")),)))


@pytest.fixture
def client_context(ca):
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def wait(fileobj, mask: int) -> None:
    select.select([fileobj] if mask & READ else [], [fileobj] if mask & WRITE else [], [],
                  WAIT_S)


class Served:
    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.envelopes = []
        self.descriptions: list[str] = []
        self.handshake_waits: list[int] = []
        self.discarded = 0


def handshake(transport: TlsTransport, served: Served) -> None:
    for _ in range(STEPS):
        if transport.handshake():
            served.descriptions.append(tls.describe(transport.sock))
            return
        served.handshake_waits.append(transport.handshake_wants)
        wait(transport, transport.handshake_wants)  # READ or WRITE, as the handshake says
    raise AssertionError("handshake did not finish")


def flush(transport, conn: SmtpServerConnection) -> None:
    transport.pending += conn.data_to_send()
    for _ in range(STEPS):
        if not transport.pending:
            return
        try:
            sent = transport.write(transport.pending, 0)
        except BlockingIOError:
            wait(transport, transport.write_wants)
            continue
        transport.pending = transport.pending[sent:]
    raise AssertionError("flush did not finish")


def serve(sock: socket.socket, context: ssl.SSLContext, listener, served: Served) -> None:
    """One session, as the worker will run it (minus timers and fault rules)."""
    config = load_config()
    conn = SmtpServerConnection(protocol_settings(config, listener))
    sock.setblocking(False)
    transport: PlainTransport | TlsTransport = PlainTransport(sock)
    if listener.tls == "implicit":
        transport = TlsTransport.wrap(sock, context)
        handshake(transport, served)
        conn.tls_started(served.descriptions[-1])  # before the greeting
    conn.greet()
    flush(transport, conn)
    for _ in range(STEPS):
        if not transport.has_buffered_input:
            wait(transport, transport.read_wants)
        try:
            n = transport.read_into(conn.buffer.free_view())
        except BlockingIOError:
            continue
        if n == 0:
            break
        conn.buffer.commit(n)
        while True:
            event = conn.next_event()
            if event is NEED_DATA or event is PAUSED or isinstance(event, ConnectionClosed):
                break
            if isinstance(event, BodyChunk):
                served.bodies[-1] += bytes(event.data)
                continue
            if isinstance(event, DataStarted):
                served.bodies.append(b"")
                served.envelopes.append(event.envelope)
            if isinstance(event, MessageEnd):
                conn.accept(f"Q{len(served.bodies)}")
            elif type(event).__name__ != "MessageRejected":
                conn.accept()
        flush(transport, conn)
        if conn.awaiting_tls:
            # The 220 is out (flush() finished): switch the same socket to TLS. The
            # worker unregisters the old transport from its selector first (its socket
            # is detached now) and registers the new one for handshake_wants.
            transport = transport.start_tls(context)
            handshake(transport, served)
            conn.tls_started(served.descriptions[-1])
        if conn.closed:
            break
    served.discarded = conn.discarded_after_starttls
    transport.close()


def run(listener: Listener, client, context: ssl.SSLContext) -> tuple[Served, object]:
    with socket.create_server(("127.0.0.1", 0)) as server_socket:
        port = server_socket.getsockname()[1]
        result: dict[str, object] = {}

        def client_thread() -> None:
            try:
                result["value"] = client(port)
            except Exception as exc:  # reported by the test below
                result["error"] = exc

        thread = threading.Thread(target=client_thread, daemon=True)
        thread.start()
        server_socket.settimeout(10)
        sock, _ = server_socket.accept()
        served = Served()
        try:
            serve(sock, context, listener, served)
        finally:
            sock.close()
        thread.join(10)
    assert not thread.is_alive()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return served, result.get("value")


def listener(tls_mode: str, require_tls: bool = False) -> Listener:
    return Listener(ListenAddress("127.0.0.1", 0, socket.AF_INET), tls_mode, require_tls)


MESSAGE = b"Subject: hi\r\n\r\nover TLS\r\n"


def test_smtplib_starttls_then_mail(context, client_context):
    def client(port: int):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.ehlo("client.example")
            offered = smtp.has_extn("starttls")
            smtp.starttls(context=client_context)
            smtp.ehlo("client.example")
            still_offered = smtp.has_extn("starttls")
            smtp.sendmail("a@example.org", ["b@mx.test"], MESSAGE)
            return offered, still_offered

    served, (offered, still_offered) = run(listener("starttls", require_tls=True), client,
                                           context)
    assert (offered, still_offered) == (True, False)
    assert served.bodies == [MESSAGE]
    (envelope,) = served.envelopes
    assert envelope.tls == served.descriptions[0]
    assert served.descriptions[0].startswith("TLSv1.3 with cipher ")
    # The server waits for the ClientHello first; on a busy machine the client's
    # flights may both be there whenever it looks, and it never waits at all.
    assert served.handshake_waits[:1] in ([], [READ])


def test_require_tls_refuses_mail_in_plaintext(context):
    def client(port: int):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.ehlo("client.example")
            return smtp.mail("a@example.org")

    served, reply = run(listener("starttls", require_tls=True), client, context)
    assert reply == (530, b"5.7.0 Must issue a STARTTLS command first")


def test_implicit_tls(context, client_context):
    def client(port: int):
        with smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=client_context) as smtp:
            smtp.ehlo("client.example")
            offered = smtp.has_extn("starttls")
            smtp.sendmail("a@example.org", ["b@mx.test"], MESSAGE)
            return offered

    served, offered = run(listener("implicit"), client, context)
    assert offered is False
    assert served.bodies == [MESSAGE] and served.envelopes[0].tls == served.descriptions[0]


def test_commands_injected_before_the_handshake_are_never_run(context, client_context):
    """CVE-2011-0411 over a real connection: STARTTLS and a MAIL in one segment; the
    MAIL gets no reply, in plaintext or in TLS, and the TLS session starts afresh."""
    def client(port: int):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            replies = b""
            sock.sendall(b"EHLO client.example\r\n")
            while b"250 SMTPUTF8\r\n" not in replies:
                replies += sock.recv(4096)
            sock.sendall(b"STARTTLS\r\nMAIL FROM:<a@example.org>\r\n")
            while not replies.endswith(b"220 2.0.0 Ready to start TLS\r\n"):
                replies += sock.recv(4096)
            with client_context.wrap_socket(sock, server_hostname="mx.test") as secure:
                secure.sendall(b"RCPT TO:<b@mx.test>\r\nQUIT\r\n")
                after = b""
                while b"221" not in after:
                    chunk = secure.recv(4096)
                    if not chunk:
                        break
                    after += chunk
            return replies, after

    served, (plain, secure) = run(listener("starttls"), client, context)
    assert plain.count(b"\r\n") == 9  # greeting, 7 EHLO lines, the 220 to STARTTLS
    assert served.discarded == len(b"MAIL FROM:<a@example.org>\r\n")
    assert b"250 2.1.0" not in plain + secure
    # No MAIL was run: RCPT finds no transaction in the fresh TLS session.
    assert secure == b"503 5.5.1 Error: need MAIL command\r\n221 2.0.0 Bye\r\n"
