"""TLS on a real server, as a client sees it: STARTTLS (RFC 3207) and its edges, plaintext
injection at the switch (CVE-2011-0411), require_tls, implicit TLS (RFC 8314), the
starttls fault stage, and what goes through the encrypted path (pipelining, a large
body, close_notify). Replies are compared with the core's own wire bytes."""

from __future__ import annotations

import re
import signal
import smtplib

import pytest

pytest.importorskip("trustme")

from minismtp.smtp import replies  # noqa: E402
from support.tlsserver import (  # noqa: E402
    HOST, NAME, free_ports, start_tls, tls_overrides, wait_for_metric,
)

MAIL_FROM = b"MAIL FROM:<a@example.org>\r\n"
BODY = b"Subject: over TLS\r\n\r\nhello\r\n"


@pytest.fixture
def starttls_server(make_server, tls_files):
    """One worker, one STARTTLS listener."""
    return make_server(tls_overrides(*tls_files, [f"{HOST}:0"]))


def ehlo_keywords(reply) -> list[bytes]:
    return [line[4:] for line in reply.lines[1:]]


def secure(client, context, name: str = "client.test"):
    """EHLO, STARTTLS, handshake, EHLO again; the second EHLO reply."""
    client.hello(name)
    client.cmd("STARTTLS", 220)
    start_tls(client, context)
    return client.cmd(f"EHLO {name}", 250)


def stored_ids(server) -> dict[str, bytes]:
    return {key.split(".")[0] + "." + key.split(".")[1]: data
            for key, data in server.maildir_messages()}


# --- STARTTLS ----------------------------------------------------------------------------

def test_plaintext_after_starttls_is_dropped_counted_and_logged(starttls_server, raw_clients,
                                                                 pki):
    server = starttls_server
    client = raw_clients(server.port)
    assert b"STARTTLS" in ehlo_keywords(client.hello())
    client.send(b"STARTTLS\r\n" + MAIL_FROM)  # one segment: the injection
    assert client.reply().raw == replies.READY_FOR_TLS.wire
    assert client.quiet_for(0.3)  # no reply to the injected MAIL in plaintext
    sock = start_tls(client, pki.client_context())
    assert sock.version() is not None
    # A fresh session: no HELO yet, so MAIL is out of sequence; nothing injected survived.
    assert client.cmd("MAIL FROM:<b@example.org>", 503).raw == replies.NEED_HELO.wire
    client.cmd("EHLO client.test", 250)
    assert client.cmd("RCPT TO:<r@example.org>", 503).raw == replies.NEED_MAIL.wire
    queue_id = client.send_message(BODY).queue_id
    client.cmd("QUIT", 221)
    assert b"250 2.1.0" not in client.buf
    samples = wait_for_metric(server, "minismtp_tls_plaintext_discarded_bytes_total",
                              len(MAIL_FROM))
    assert samples["minismtp_tls_sessions_total"] == 1
    server.wait_for_log(rf"starttls: peer=127\.0\.0\.1 sent {len(MAIL_FROM)} bytes after "
                        r"STARTTLS; discarded")
    stored = stored_ids(server)[queue_id]
    assert stored.endswith(b"\r\n" + BODY) and b"<b@example.org>" not in stored


def test_starttls_edges(starttls_server, raw_clients, pki):
    client = raw_clients(starttls_server.port)
    client.hello()
    assert client.cmd("STARTTLS now", 501).raw == replies.STARTTLS_SYNTAX.wire
    client.cmd("MAIL FROM:<a@example.org>", 250)
    assert client.cmd("STARTTLS", 503).raw == replies.BAD_SEQUENCE.wire  # in a transaction
    client.cmd("RSET", 250)
    client.cmd("STARTTLS", 220)
    start_tls(client, pki.client_context())
    hello = client.cmd("EHLO client.test", 250)
    assert hello.lines[0] == f"250-{NAME}".encode()
    assert b"STARTTLS" not in ehlo_keywords(hello) and b"PIPELINING" in ehlo_keywords(hello)
    assert client.cmd("STARTTLS", 503).raw == replies.TLS_ALREADY_ACTIVE.wire
    assert client.cmd("STARTTLS x", 503).raw == replies.TLS_ALREADY_ACTIVE.wire
    assert client.send_message(BODY).code == 250


def test_require_tls_listener_and_a_plain_one_beside_it(make_server, raw_clients, pki,
                                                        tls_files):
    strict, plain = free_ports(2)
    server = make_server(tls_overrides(*tls_files, [
        {"address": f"{HOST}:{strict}", "tls": "starttls", "require_tls": True},
        {"address": f"{HOST}:{plain}", "tls": "none"},
    ]))
    client = raw_clients(strict)
    assert b"STARTTLS" in ehlo_keywords(client.hello())
    for line in (b"MAIL FROM:<a@example.org>", b"RCPT TO:<r@example.org>", b"DATA"):
        assert client.cmd(line, 530).raw == replies.MUST_STARTTLS.wire
    client.cmd("STARTTLS", 220)
    start_tls(client, pki.client_context())
    client.cmd("EHLO client.test", 250)
    queue_id = client.send_message(BODY).queue_id
    other = raw_clients(plain)
    assert b"STARTTLS" not in ehlo_keywords(other.hello())
    assert other.cmd("STARTTLS", 502).raw == replies.NOT_IMPLEMENTED.wire
    plain_id = other.send_message(BODY).queue_id
    stored = stored_ids(server)
    assert b"with ESMTPS" in stored[queue_id] and b"with ESMTP id" in stored[plain_id]


# --- implicit TLS ------------------------------------------------------------------------

def test_implicit_tls_message_is_stored_exactly_and_counted(make_server, pki, tls_files):
    server = make_server(tls_overrides(*tls_files, [{"address": f"{HOST}:0",
                                                     "tls": "implicit"}]))
    body = b"Subject: implicit\r\nX-Bytes: \xc3\xa9\r\n\r\nline one\r\n\r\n.. dot\r\nend\r\n"
    with smtplib.SMTP_SSL(HOST, server.port, context=pki.client_context(), timeout=10) as smtp:
        code, features = smtp.ehlo("client.test")
        assert code == 250 and b"STARTTLS" not in features
        cipher = smtp.sock.cipher()[0]
        assert smtp.sock.version() == "TLSv1.3"
        smtp.sendmail("a@example.org", ["r@example.org"], body)
    [(key, stored)] = server.maildir_messages()
    header, _, rest = stored.partition(b"\r\n\r\n")
    assert rest.endswith(body.split(b"\r\n\r\n", 1)[1])
    assert stored.endswith(body)
    assert f"(using TLSv1.3 with cipher {cipher} (".encode() in stored[:stored.index(body)]
    assert re.search(rb"with ESMTPS id \S+", stored)
    server.wait_for_log(rf"id=\S+ peer=127\.0\.0\.1 listener=\S+ from=<a@example\.org> rcpts=1 "
                        rf"size={len(body)} tls=TLSv1\.3 with cipher {cipher} result=250 queued")
    samples = wait_for_metric(server, "minismtp_tls_sessions_total", 1)
    assert samples["minismtp_tls_handshake_seconds_count"] == 1
    assert samples['minismtp_tls_handshake_seconds_bucket{le="+Inf"}'] == 1


# --- the starttls fault stage ----------------------------------------------------------

def test_starttls_fault_reply_leaves_the_session_in_plaintext(make_server, raw_clients,
                                                              tls_files):
    refused = "454 4.7.0 TLS not available"
    server = make_server(tls_overrides(*tls_files, [f"{HOST}:0"], faults={
        "rules": [{"name": "no-tls", "stage": "starttls", "reply": refused}]}))
    client = raw_clients(server.port)
    client.hello()
    assert client.cmd("STARTTLS", 454).raw == refused.encode() + b"\r\n"
    assert b"STARTTLS" in ehlo_keywords(client.cmd("EHLO client.test", 250))
    queue_id = client.send_message(BODY).queue_id
    stored = stored_ids(server)[queue_id]
    assert stored.endswith(BODY) and b"with ESMTP id" in stored
    assert wait_for_metric(server, "minismtp_tls_sessions_total", 0)


def test_starttls_fault_disconnect_closes_without_a_reply(make_server, raw_clients,
                                                          tls_files):
    server = make_server(tls_overrides(*tls_files, [f"{HOST}:0"], faults={
        "rules": [{"name": "drop", "stage": "starttls", "disconnect": True}]}))
    client = raw_clients(server.port)
    client.hello()
    client.send(b"STARTTLS\r\n")
    assert client.wait_closed() == b""


# --- the encrypted path ------------------------------------------------------------------

def test_pipelined_transactions_in_one_record_all_answered(starttls_server, raw_clients, pki):
    """Several transactions in one TLS record, larger than one read: what OpenSSL already
    decrypted must be served even while the worker waits for each commit (fsync)."""
    client = raw_clients(starttls_server.port)
    secure(client, pki.client_context())
    bodies = [b"Subject: %d\r\n\r\n" % n + b"x" * 1500 + b"\r\n" for n in range(5)]
    block = b"".join(client.envelope("a@example.org", ["r@example.org"]) + client.stuff(body)
                     for body in bodies) + b"QUIT\r\n"
    assert 4096 < len(block) < 16384  # one record, more than one read of the buffer
    client.send(block)
    ids = []
    for _ in bodies:
        assert client.reply().raw == replies.SENDER_OK.wire
        assert client.reply().raw == replies.RECIPIENT_OK.wire
        assert client.reply().code == 354
        ids.append(client.reply().queue_id)
    assert client.reply().raw == replies.CLOSING.wire
    stored = stored_ids(starttls_server)
    assert [stored[i].endswith(b"\r\n" + body) for i, body in zip(ids, bodies)] == [True] * 5


def test_large_message_over_tls_is_stored_byte_for_byte(starttls_server, raw_clients, pki):
    client = raw_clients(starttls_server.port, timeout=60)
    secure(client, pki.client_context())
    line = bytes(range(33, 127)) + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * (5 * 1024 * 1024 // len(line))
    queue_id = client.send_message(body).queue_id
    stored = stored_ids(starttls_server)[queue_id]
    assert stored.endswith(b"\r\n" + body) and len(stored) - len(body) < 1024


def test_quit_under_tls_sends_close_notify(starttls_server, raw_clients, pki):
    client = raw_clients(starttls_server.port)
    client.hello()
    client.cmd("STARTTLS", 220)
    # Without ragged EOFs suppressed, a FIN that comes without close_notify raises
    # SSLEOFError; after close_notify the read is a clean b"".
    client.sock = pki.client_context().wrap_socket(client.sock, server_hostname=NAME,
                                                   suppress_ragged_eofs=False)
    client.cmd("EHLO client.test", 250)
    assert client.cmd("QUIT", 221).raw == replies.CLOSING.wire
    assert client.buf == b"" and client.sock.recv(1) == b""


def test_idle_timeout_and_stop_answer_under_tls(make_server, raw_clients, pki, tls_files):
    """The server's last words reach a TLS client encrypted: 421 4.4.2 at the idle
    timeout, 421 4.3.2 to an idle session at SIGTERM."""
    server = make_server(tls_overrides(*tls_files, [f"{HOST}:0"],
                                      limits={"command_timeout": "1s"}))
    idle = raw_clients(server.port)
    secure(idle, pki.client_context())
    assert idle.reply(timeout=10).raw == replies.TIMEOUT.wire
    assert idle.wait_closed() == b""
    waiting = raw_clients(server.port)
    secure(waiting, pki.client_context())
    server.send_signal(signal.SIGTERM)
    assert waiting.reply().raw == replies.SHUTTING_DOWN.wire
    assert server.wait(15) == 0
    assert "Traceback" not in server.log_text()
