"""`openssl s_client`, the OpenSSL command-line client, speaking SMTP with STARTTLS to a
real minismtp."""

from __future__ import annotations

import re
import subprocess

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
