"""Python's smtplib, the client most Python programs send with, against a real minismtp."""

from __future__ import annotations

import smtplib
from email.message import EmailMessage
from email.policy import SMTP


from support.messages import expect_lf_stored, expect_stored



def _message() -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Sender <sender@example.org>"
    msg["To"] = "rcpt@example.org"
    msg["Bcc"] = "hidden@example.org"
    msg["Subject"] = "smtplib caf\u00e9"
    msg.set_content("first line\n.dot-led line\nlast line\n")
    return msg


def test_send_message(server):
    """`send_message` sends the message with CRLF lines and without its Bcc header, to
    every address in To and Bcc: all accepted, and the file holds exactly what a
    CRLF flattening without Bcc gives."""
    msg = _message()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
        refused = smtp.send_message(msg)
    assert refused == {}
    del msg["Bcc"]
    [(_, raw)] = server.maildir_messages()
    expect_stored(raw, msg.as_bytes(policy=SMTP))
    # Two envelope recipients: by default (delivery.envelope_recipients: one) neither is
    # named, so the Bcc recipient stays hidden from whoever reads this mailbox.
    assert b"hidden@example.org" not in raw and b"Delivered-To:" not in raw


def test_sendmail_with_lf_bytes(server):
    """`sendmail(..., msg.as_bytes())` passes bytes through as they are: LF-only lines
    (smtplib fixes line endings of a str, not of bytes). With the server's default
    settings they are accepted and stored with LF endings."""
    msg = _message()
    del msg["Bcc"]
    data = msg.as_bytes()
    assert b"\r" not in data
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
        refused = smtp.sendmail("sender@example.org", ["rcpt@example.org"], data)
    assert refused == {}
    [(_, raw)] = server.maildir_messages()
    # smtplib dot-stuffs after any line end, so the dot-led line arrives as "..dot";
    # a server taking LF as a line end unstuffs it again.
    expect_lf_stored(raw, data)
