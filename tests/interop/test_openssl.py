"""`openssl s_client`, the OpenSSL command-line client, speaking SMTP with STARTTLS to a
real minismtp."""

from __future__ import annotations

import queue
import re
import subprocess
import threading
import time

import pytest

from support.messages import expect_stored, stored_file, text_message

trustme = pytest.importorskip("trustme")

pytestmark = pytest.mark.neighbour("openssl")

HOSTNAME = "mx.test.invalid"


def test_starttls_session(make_server, tmp_path):
    """openssl s_client negotiates STARTTLS (RFC 3207) after EHLO, verifies the server's
    certificate against the test CA and its name, and sends a whole transaction over
    TLS: exit status 0, the message stored byte for byte, and `Received:` says ESMTPS."""
    ca = trustme.CA()
    cert = ca.issue_cert(HOSTNAME)
    cert_path, key_path, ca_path = (tmp_path / name for name in ("cert.pem", "key.pem",
                                                                  "ca.pem"))
    cert.private_key_pem.write_to_path(str(key_path))
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    ca.cert_pem.write_to_path(str(ca_path))
    server = make_server({
        "server": {"listen": [{"address": "127.0.0.1:0", "tls": "starttls"}]},
        "tls": {"certificates": [{"cert": str(cert_path), "key": str(key_path)}]}})
    message = text_message("over starttls", "sent inside TLS\n")
    # s_client reads commands from stdin (-crlf: LF becomes CRLF) and keeps reading the
    # server's replies after stdin ends (-ign_eof), until the server closes after QUIT.
    commands = (b"EHLO client.test\nMAIL FROM:<sender@example.org>\n"
                b"RCPT TO:<rcpt@example.org>\nDATA\n"
                + message.replace(b"\r\n", b"\n") + b".\nQUIT\n")
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", "-starttls", "smtp",
         "-name", "client.test", "-servername", HOSTNAME, "-verify_hostname", HOSTNAME,
         "-CAfile", str(ca_path), "-verify_return_error", "-crlf", "-ign_eof", "-brief"],
        input=commands, capture_output=True, timeout=60)
    output = result.stdout.decode(errors="replace")
    errors = result.stderr.decode(errors="replace")
    assert result.returncode == 0, errors + output
    assert "Verification: OK" in errors, errors
    [queue_id] = re.findall(r"^250 2\.0\.0 Ok: queued as (\S+)\r?$", output, re.M)
    raw = stored_file(server.mail_dir, queue_id)
    expect_stored(raw, message)
    assert b"with ESMTPS id " in raw


def test_key_updates_midsession(make_server, tmp_path):
    """TLS 1.3 KeyUpdate from a real OpenSSL peer: s_client's `K` command (an update,
    asking the server to update its own keys too) and `k` (an update alone), between
    commands and between a message's lines; the session goes on under the new keys, the
    message is stored whole. Lines starting with R, Q, K or k are s_client's commands
    (renegotiate, quit, key updates), so the SMTP ones go in lower case, which SMTP
    allows (RFC 5321 2.4)."""
    ca = trustme.CA()
    cert = ca.issue_cert(HOSTNAME)
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_pem.write_to_path(str(key_path))
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    server = make_server({
        "server": {"listen": [{"address": "127.0.0.1:0", "tls": "starttls"}]},
        "tls": {"certificates": [{"cert": str(cert_path), "key": str(key_path)}]}})
    proc = subprocess.Popen(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", "-starttls", "smtp",
         "-name", "client.test", "-tls1_3", "-crlf", "-brief"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(raw.decode(errors="replace"))
                                     for raw in proc.stdout], daemon=True).start()

    seen: list[str] = []

    def say(text: str, reply: str | None = None) -> str:
        # s_client takes a whole read of its input as a command when it begins with a
        # command letter: a key update must come alone, in a read of its own.
        command = text in ("K", "k")
        if command:
            time.sleep(0.5)
        proc.stdin.write(text.encode() + b"\n")
        proc.stdin.flush()
        if command:
            time.sleep(0.5)
        while reply is not None:
            line = lines.get(timeout=15)
            seen.append(line)
            if re.match(reply, line):
                return line
        return ""

    try:
        say("ehlo client.test", r"250 ")
        say("K")  # update, and ask the server to update its keys
        say("mail from:<sender@example.org>", r"250 2\.1\.0")
        say("k")  # update alone
        say("rcpt to:<rcpt@example.org>", r"250 2\.1\.5")
        say("data", r"354 ")
        say("Subject: key updates")
        say("")
        say("before the update")
        say("K")
        say("after the update")
        queued = say(".", r"250 2\.0\.0 Ok: queued as ")
        say("quit", r"221 ")
    except queue.Empty:
        raise AssertionError(f"no reply; the replies so far: {seen}") from None
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert proc.stderr.read().decode(errors="replace").count("KEYUPDATE") == 3
    raw = stored_file(server.mail_dir, queued.split()[-1])
    assert raw.endswith(b"Subject: key updates\n\nbefore the update\nafter the update\n")
