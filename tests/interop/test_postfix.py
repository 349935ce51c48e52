"""Postfix as the sending MTA: its own instance takes mail over SMTP and relays it to
minismtp (relayhost), as a smarthost setup would."""

from __future__ import annotations

import email
import re
import smtplib
import time
from email.policy import default

import pytest

from support.messages import line_ending, split_trace
from support.tlsserver import Pki, tls_overrides

pytestmark = pytest.mark.neighbour("postfix")

BURST = 100
DRAIN_TIMEOUT_S = 90


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
        eol = line_ending(raw)
        parsed = email.message_from_bytes(message, policy=default)
        message_id = parsed["Message-ID"]
        assert message_id in sent and message_id not in seen
        seen.add(message_id)
        assert "by relay.test.invalid (Postfix)" in parsed["Received"]
        expected_body = sent[message_id].split(b"\r\n\r\n", 1)[1].replace(b"\r\n", eol)
        assert message.split(eol + eol, 1)[1] == expected_body, message_id
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
