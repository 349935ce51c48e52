"""swaks, the SMTP test tool, against a real minismtp: each message is built here, handed
to swaks with `--data @file`, and the stored file compared with it byte for byte.

swaks ends the last line of the data itself (it appends CRLF, then the lone dot), so the
file it is given is the message without its final CRLF; it dot-stuffs and sends 8-bit
bytes as they are.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from support.messages import (attachment_message, eight_bit_message, expect_stored,
                              stored_file, text_message)
from support.tlsserver import Pki, tls_overrides

pytestmark = pytest.mark.neighbour("swaks")

SENDER = "sender@example.org"
RECIPIENT = "rcpt@example.org"
QUEUED = re.compile(r"^<[-~]  250 2\.0\.0 Ok: queued as (\S+)$", re.M)  # ~: under TLS
TIMEOUT_S = 120


def swaks(port: int, message: bytes, workdir: Path, *args: str,
          recipients: tuple[str, ...] = (RECIPIENT,)) -> subprocess.CompletedProcess:
    assert message.endswith(b"\r\n")
    data = workdir / "swaks-data.eml"
    data.write_bytes(message[:-2])  # swaks adds the last CRLF
    cmd = ["swaks", "--server", "127.0.0.1", "--port", str(port), "--helo", "client.test",
           "--from", SENDER, "--to", ",".join(recipients), "--data", f"@{data}",
           "--timeout", "60", *args]
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=TIMEOUT_S, text=True, errors="replace")


def queue_id(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"swaks exit {result.returncode}:\n{result.stdout[-3000:]}"
    [found] = QUEUED.findall(result.stdout)
    return found


def test_plain(server, tmp_path):
    """A plain swaks session (EHLO, MAIL, RCPT, DATA one reply at a time, QUIT) ends in
    exit status 0, a queued reply, and the message stored byte for byte, a line that
    starts with a dot included (swaks stuffs it, minismtp unstuffs it)."""
    message = text_message("plain swaks", "first line\n.starts with a dot\n..two dots\n")
    result = swaks(server.port, message, tmp_path)
    qid = queue_id(result)
    assert "<-  221 2.0.0 Bye" in result.stdout
    expect_stored(stored_file(server.mail_dir, qid), message)


def test_pipeline(server, tmp_path):
    """With `--pipeline` swaks sends MAIL, both RCPTs and DATA in one write before reading
    any reply (RFC 2920): the transcript shows all four commands before the first reply,
    every reply in order, and the message is stored byte for byte."""
    message = text_message("pipelined swaks", "one\ntwo\n")
    result = swaks(server.port, message, tmp_path, "--pipeline",
                   recipients=(RECIPIENT, "second@example.org"))
    qid = queue_id(result)
    lines = result.stdout.splitlines()
    first_mail = next(i for i, line in enumerate(lines) if line.startswith(" -> MAIL FROM"))
    assert [line.split()[1] for line in lines[first_mail:first_mail + 4]] == [
        "MAIL", "RCPT", "RCPT", "DATA"]
    assert [line[4:14] for line in lines[first_mail + 4:first_mail + 8]] == [
        "250 2.1.0 ", "250 2.1.5 ", "250 2.1.5 ", "354 End da"]
    expect_stored(stored_file(server.mail_dir, qid), message)


def test_twenty_mib_attachment(server, tmp_path):
    """A 20 MiB attachment (about 27 MiB of base64) under the default 32M limit is
    stored byte for byte, and its attachment decodes back to the bytes attached."""
    message, attachment = attachment_message(20 * 1024 * 1024)
    result = swaks(server.port, message, tmp_path, "--suppress-data")
    raw = stored_file(server.mail_dir, queue_id(result))
    expect_stored(raw, message)
    import email
    from email.policy import default
    parsed = email.message_from_bytes(raw, policy=default)
    [part] = list(parsed.iter_attachments())
    assert part.get_content() == attachment


def test_over_the_size_limit_gets_552(make_server, tmp_path):
    """Past `limits.max_message_size` the whole message is still read, then refused with
    552 5.3.4 after its end: swaks reports the refusal of the message (exit status 26),
    the session goes on to a 221, and nothing is stored or left in tmp/."""
    server = make_server({"limits": {"max_message_size": "16M"}})
    message, _ = attachment_message(20 * 1024 * 1024)
    result = swaks(server.port, message, tmp_path, "--suppress-data")
    assert result.returncode == 26, result.stdout[-3000:]
    assert re.search(r"^<\*\* +552 5\.3\.4 ", result.stdout, re.M), result.stdout[-3000:]
    assert "<-  221 2.0.0 Bye" in result.stdout
    assert server.files("new") == [] and server.files("tmp") == []


def test_eight_bit_body(server, tmp_path):
    """Every byte from 0x80 to 0xFF in the body (8BITMIME is offered) reaches the file
    unchanged, a dot-led line and an empty line too."""
    message = eight_bit_message()
    result = swaks(server.port, message, tmp_path)
    assert "<-  250-8BITMIME" in result.stdout
    expect_stored(stored_file(server.mail_dir, queue_id(result)), message)


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_tls(make_server, tmp_path, mode):
    """`--tls` (STARTTLS, RFC 3207) and `--tlsc` (TLS from the first byte, RFC 8314):
    swaks reports the TLS session in its transcript, the message is stored byte for
    byte, and minismtp's Received line says ESMTPS."""
    pki = Pki()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    Pki.write(pki.issue(), cert, key)
    listener = "127.0.0.1:0" if mode == "starttls" else {"address": "127.0.0.1:0",
                                                        "tls": "implicit"}
    server = make_server(tls_overrides(cert, key, [listener]))
    message = text_message(f"swaks over TLS ({mode})", "over TLS\n")
    result = swaks(server.port, message, tmp_path, "--tls" if mode == "starttls" else "--tlsc")
    qid = queue_id(result)
    assert re.search(r"=== TLS started with cipher TLSv1\.[23]:", result.stdout), result.stdout
    stored = stored_file(server.mail_dir, qid)
    expect_stored(stored, message)
    assert b"with ESMTPS id" in stored
