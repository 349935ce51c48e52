"""Postfix as the sending MTA: its own instance takes mail over SMTP and relays it to
minismtp (relayhost), as a smarthost setup would: in plaintext, over STARTTLS, and over
STARTTLS logged in with SASL AUTH (PLAIN, which Cyrus SASL picks from what minismtp
offers) where the listener requires it."""

from __future__ import annotations

import base64
import email
import re
import smtplib
import time
from email.policy import default

import pytest

from support.messages import line_ending, split_trace
from support.tlsserver import Pki, tls_overrides
from support.users import users_file

pytestmark = pytest.mark.neighbour("postfix")

BURST = 100
DRAIN_TIMEOUT_S = 90
SASL_USER = "relay-user"
SASL_PASSWORD = "correct horse battery staple"  # a space in a texthash: value, too
WRONG_PASSWORD = "Wrong-Guess-4417"


def burst_message(i: int) -> bytes:
    """Message `i` of the burst: its own Message-ID, and a body with a dot-led line (which
    Postfix dot-stuffs on the way out), 8-bit text and lines of different lengths."""
    lines = [f"message {i} of the burst", ".dot-led line", "", "caf\u00e9 " * (i % 7 + 1),
             "x" * (i * 7 % 900)]
    body = "".join(line + "\r\n" for line in lines).encode()
    head = (f"From: sender@example.org\r\nTo: rcpt{i:03d}@example.org\r\n"
            f"Subject: burst {i}\r\nMessage-ID: <burst-{i:03d}@client.test>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n").encode()
    return head + body


def expect_relayed(raw: bytes, sent: bytes) -> email.message.EmailMessage:
    """`raw`, a file minismtp stored, holds `sent` as Postfix relays it: after minismtp's
    trace headers the message with Postfix's Received line, and `sent`'s body byte for
    byte (in the stored file's line ending). Returns the message, parsed."""
    _, message = split_trace(raw)
    eol = line_ending(raw)
    parsed = email.message_from_bytes(message, policy=default)
    assert "by relay.test.invalid (Postfix)" in parsed["Received"]
    expected_body = sent.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", eol)
    assert message.split(eol + eol, 1)[1] == expected_body, parsed["Message-ID"]
    return parsed


def wait_for_log(relay, regex: str) -> str:
    """Postfix's log once `regex` matches in it (it fails after DRAIN_TIMEOUT_S)."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while not re.search(regex, log := relay.log()):
        assert time.monotonic() < deadline, f"no {regex!r} in Postfix's log:\n{log[-3000:]}"
        time.sleep(0.1)
    return log


def test_postfix_relays_a_burst_of_100(server, postfix):
    """100 messages injected into a Postfix instance all leave its queue for minismtp:
    its log shows status=sent with minismtp's queue id for each, its queues end empty,
    and minismtp stored each message once, under that id, with the body sent (byte for
    byte, in the stored file's line ending) and Postfix's own Received line."""
    relay = postfix(server.port)
    sent = {f"<burst-{i:03d}@client.test>": burst_message(i) for i in range(BURST)}
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
        for i, message in enumerate(sent.values()):
            refused = smtp.sendmail("sender@example.org", [f"rcpt{i:03d}@example.org"],
                                    message)
            assert refused == {}

    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        if len(relay.sent_ids()) >= BURST and not relay.queued():
            break
        time.sleep(0.2)
    log = relay.log()
    sent_ids = relay.sent_ids()
    assert len(sent_ids) == BURST, f"{len(sent_ids)} sent; log tail:\n{log[-3000:]}"
    assert relay.queued() == [], "messages left in Postfix's queues"
    assert "status=deferred" not in log and "status=bounced" not in log

    stored = {".".join(path.name.split(".")[:2]): path
              for path in server.files("new")}
    assert len(stored) == BURST
    assert sorted(stored) == sorted(sent_ids)
    seen = set()
    for path in stored.values():
        raw = path.read_bytes()
        _, message = split_trace(raw)
        message_id = email.message_from_bytes(message, policy=default)["Message-ID"]
        assert message_id in sent and message_id not in seen
        seen.add(message_id)
        expect_relayed(raw, sent[message_id])
    assert len(seen) == BURST


def test_postfix_relays_over_tls_when_it_must(make_server, postfix, tmp_path):
    """With `smtp_tls_security_level = encrypt` Postfix sends only over TLS: it takes
    minismtp's STARTTLS, its log says so, and the stored message's Received line written
    by minismtp says ESMTPS with the protocol and cipher."""
    pki = Pki()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    Pki.write(pki.issue(), cert, key)
    server = make_server(tls_overrides(cert, key, ["127.0.0.1:0"]))
    relay = postfix(server.port, smtp_tls="encrypt", main_cf="smtp_tls_loglevel = 1\n")
    message = burst_message(0)
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
        assert smtp.sendmail("sender@example.org", ["rcpt000@example.org"], message) == {}
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline and not relay.sent_ids():
        time.sleep(0.2)
    log = relay.log()
    assert len(relay.sent_ids()) == 1, log[-3000:]
    assert re.search(r"TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:\d+: "
                     r"TLSv1\.[23] with cipher", log), log[-3000:]
    [path] = server.files("new")
    trace, _ = split_trace(path.read_bytes())
    assert re.search(rb"\(using TLSv1\.[23] with cipher [^\n]+\)\s+by mx\.test\.invalid "
                     rb"\(minismtp\) with ESMTPS id", trace), trace


def sasl_relay(make_server, postfix, tmp_path, password: str):
    """minismtp with one STARTTLS listener that requires AUTH (an htpasswd file with
    SASL_USER), and a Postfix instance relaying to it only over TLS, logging in as
    SASL_USER with `password`: (server, relay)."""
    pki = Pki()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    Pki.write(pki.issue(), cert, key)
    users = users_file(tmp_path / "users", {SASL_USER: SASL_PASSWORD})
    auth = {"mode": "htpasswd", "users_file": str(users), "require": True}
    server = make_server(tls_overrides(
        cert, key, [{"address": "127.0.0.1:0", "tls": "starttls", "auth": auth}]))
    relay = postfix(server.port, smtp_tls="encrypt", sasl=(SASL_USER, password))
    return server, relay


def send(relay, message: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
        assert smtp.sendmail("sender@example.org", ["rcpt000@example.org"], message) == {}


def test_postfix_logs_in_with_sasl_over_tls(make_server, postfix, tmp_path):
    """Postfix with smtp_sasl_auth_enable and a texthash: password map logs in to a
    listener that requires AUTH, over STARTTLS: the message is stored once, as relayed;
    minismtp's Received line says ESMTPSA (RFC 3848) without naming the account; its
    log names the user on the message's line, and the password appears nowhere in it."""
    server, relay = sasl_relay(make_server, postfix, tmp_path, SASL_PASSWORD)
    message = burst_message(1)
    send(relay, message)
    log = wait_for_log(relay, r"status=(sent|deferred|bounced)")
    sent_ids = relay.sent_ids()
    assert len(sent_ids) == 1, log[-3000:]
    [queue_id] = sent_ids
    assert relay.queued() == []

    [path] = server.files("new")
    raw = path.read_bytes()
    assert path.name.startswith(queue_id + ".")
    expect_relayed(raw, message)
    trace, _ = split_trace(raw)
    assert re.search(rb"\(using TLSv1\.[23] with cipher [^\n]+\)\s+by mx\.test\.invalid "
                     rb"\(minismtp\) with ESMTPSA id " + queue_id.encode(), trace), trace
    assert SASL_USER.encode() not in trace

    server.wait_for_log(rf"id={queue_id} peer=127\.0\.0\.1 .* user={SASL_USER} result=250")
    server.wait_for_log(rf"disconnect from 127\.0\.0\.1:\d+ .*user={SASL_USER} ")
    minismtp_log = server.log_text()
    assert not re.search(r"auth: .* failed", minismtp_log), minismtp_log
    for secret in (SASL_PASSWORD, base64.b64encode(SASL_PASSWORD.encode()).decode(),
                   base64.b64encode(f"\0{SASL_USER}\0{SASL_PASSWORD}".encode()).decode()):
        assert secret not in minismtp_log


def test_postfix_with_a_wrong_password_defers(make_server, postfix, tmp_path):
    """A wrong password in Postfix's map: minismtp answers AUTH with 535 5.7.8, Postfix
    keeps the message in its deferred queue with that reply as the reason (its log and
    `postqueue -p` say so), and minismtp stores nothing. The failure is in minismtp's log
    with the user name, and the password nowhere."""
    server, relay = sasl_relay(make_server, postfix, tmp_path, WRONG_PASSWORD)
    send(relay, burst_message(2))
    log = wait_for_log(relay, r"status=(sent|deferred|bounced)")
    assert re.search(r"status=deferred \(SASL authentication failed; server "
                     r"127\.0\.0\.1\[127\.0\.0\.1\] said: 535 5\.7\.8 ", log), log[-3000:]
    assert relay.sent_ids() == []
    [queued] = relay.queued()
    assert "deferred" in queued.relative_to(relay.root / "queue").parts
    queue = " ".join(relay.postqueue().split())
    assert "rcpt000@example.org" in queue
    assert re.search(r"\(SASL authentication failed; server 127\.0\.0\.1\[127\.0\.0\.1\] "
                     r"said: 535 5\.7\.8 ", queue), queue

    server.wait_for_log(rf"auth: peer=127\.0\.0\.1 user={SASL_USER} failed")
    server.wait_for_log(r"disconnect from 127\.0\.0\.1:\d+ ")
    assert server.files("new") == [] and server.files("tmp") == []
    minismtp_log = server.log_text()
    assert "result=250" not in minismtp_log
    for secret in (WRONG_PASSWORD, base64.b64encode(WRONG_PASSWORD.encode()).decode(),
                   base64.b64encode(f"\0{SASL_USER}\0{WRONG_PASSWORD}".encode()).decode()):
        assert secret not in minismtp_log
