"""Messages for the interop tests, and what minismtp stored of them.

minismtp stores each message after its trace headers (`Return-Path:`, `Delivered-To:`,
`Received:` and its folded lines). Stored files use one line ending throughout, CRLF as
on the wire or LF, by configuration; `expect_stored` compares a message as sent with a
stored file byte for byte, in the line ending that file uses, so these tests hold either
way and still catch a single byte changed, lost or added.
"""

from __future__ import annotations

import random
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

def split_trace(raw: bytes) -> tuple[bytes, bytes]:
    """(minismtp's trace headers, the message after them) of a stored file: one
    `Return-Path:`, any `Delivered-To:`, then one `Received:` with its folded lines (a
    `Received:` after that is the message's own, from an earlier hop)."""
    def line_at(pos: int) -> bytes:
        end = raw.find(b"\n", pos)
        return raw[pos:] if end < 0 else raw[pos:end + 1]

    pos = 0
    assert raw.startswith(b"Return-Path: "), raw[:200]
    pos += len(line_at(pos))
    while raw.startswith(b"Delivered-To: ", pos):
        pos += len(line_at(pos))
    assert raw.startswith(b"Received: ", pos), raw[:500]
    pos += len(line_at(pos))
    while raw[pos:pos + 1] in (b" ", b"\t"):
        pos += len(line_at(pos))
    return raw[:pos], raw[pos:]


def line_ending(raw: bytes) -> bytes:
    """The line ending of a stored file, read from its first (trace) header line."""
    first = raw[:raw.index(b"\n") + 1]
    return b"\r\n" if first.endswith(b"\r\n") else b"\n"


def expect_stored(raw: bytes, sent: bytes) -> None:
    """Assert that the stored file `raw` holds `sent` (CRLF lines, as on the wire and
    not dot-stuffed) byte for byte after its trace headers, in the file's line ending."""
    trace, message = split_trace(raw)
    eol = line_ending(raw)
    expected = sent if eol == b"\r\n" else sent.replace(b"\r\n", b"\n")
    if eol == b"\n":
        assert b"\r" not in trace, f"mixed line endings in the trace headers: {trace!r}"
    if message != expected:
        at = next((i for i, (a, b) in enumerate(zip(message, expected)) if a != b),
                  min(len(message), len(expected)))
        raise AssertionError(
            f"stored message differs from the one sent at byte {at} "
            f"(stored {len(message)} bytes, sent {len(expected)}): "
            f"stored {message[max(0, at - 40):at + 40]!r}, "
            f"sent {expected[max(0, at - 40):at + 40]!r}")


def stored_file(mail_dir: Path, queue_id: str) -> bytes:
    """The bytes of the message minismtp stored with `queue_id` (in new/ or cur/)."""
    for sub in ("new", "cur"):
        directory = mail_dir / sub
        if directory.is_dir():
            for path in directory.iterdir():
                if path.name.startswith(queue_id + "."):
                    return path.read_bytes()
    raise AssertionError(f"no stored message {queue_id} in {mail_dir}")


def text_message(subject: str, body: str, sender: str = "sender@example.org",
                 recipient: str = "rcpt@example.org") -> bytes:
    """A small text message as CRLF bytes, headers first."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject.replace(' ', '-')}@client.test>"
    msg.set_content(body)
    return msg.as_bytes()


def eight_bit_message(sender: str = "sender@example.org",
                      recipient: str = "rcpt@example.org") -> bytes:
    """A message whose body has every byte from 0x80 to 0xFF, as 8bit text (RFC 6152),
    with a line starting with a dot and an empty line, CRLF throughout."""
    high = bytes(range(0x80, 0x100))
    lines = [high[i:i + 32] for i in range(0, len(high), 32)]
    body = b"\r\n".join([b"caf\xc3\xa9 na\xc3\xafve \xe2\x82\xac", *lines, b"", b".dot", b"end"])
    head = (f"From: {sender}\r\nTo: {recipient}\r\nSubject: eight bit\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n").encode()
    return head + body + b"\r\n"


def attachment_message(size: int, seed: int = 1, sender: str = "sender@example.org",
                       recipient: str = "rcpt@example.org") -> tuple[bytes, bytes]:
    """(message, attachment): `size` random bytes attached as base64, CRLF throughout."""
    attachment = random.Random(seed).randbytes(size)
    msg = EmailMessage(policy=SMTP)
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = f"attachment of {size} bytes"
    msg.set_content("The attachment is random bytes.\n")
    msg.add_attachment(attachment, maintype="application", subtype="octet-stream",
                       filename="random.bin")
    return msg.as_bytes(), attachment


def expect_lf_stored(raw: bytes, sent: bytes) -> None:
    """Assert that a message sent with LF-only lines (curl and smtplib pass a file's or a
    bytes object's LF lines on unchanged) is stored whole with LF endings: no CR anywhere
    in the file. Such a client ends the data with CRLF, dot, CRLF after the last LF, so a
    server that takes the LF as a line end (as Postfix does) may store one empty line more."""
    assert b"\r" not in raw, f"CR in the stored file: {raw[:300]!r}"
    _, message = split_trace(raw)
    assert message in (sent, sent + b"\n"), f"stored {message!r}, sent {sent!r}"
