"""s-nail, a mail reader (the mailx of Debian), reading minismtp's Maildir directly."""

from __future__ import annotations

import os
import smtplib
import subprocess

import pytest

from support.messages import text_message

pytestmark = pytest.mark.neighbour("s-nail")

SUBJECT = "read by s-nail"


def snail(*args: str) -> subprocess.CompletedProcess:
    # -:/ loads no resource files; -R opens the folder read-only; -# is batch mode.
    env = {**os.environ, "LC_ALL": "C.UTF-8", "MAIL": "/dev/null", "HOME": "/nonexistent"}
    return subprocess.run(["s-nail", "-:/", "-R", *args], stdin=subprocess.DEVNULL,
                          capture_output=True, env=env, timeout=30)


def test_snail_reads_the_headers_and_body(server):
    """With the default settings a stored message reads cleanly in a Unix mail reader:
    the header summary shows the subject as sent (no stray CR shown as a control
    character), the body prints without CRs, and s-nail has no complaint about the file
    (today's CRLF files give "Not a header line" and "Malformed message")."""
    message = text_message(SUBJECT, "line one\nline two\n")
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
        smtp.sendmail("sender@example.org", ["rcpt@example.org"], message)
    assert len(server.files("new")) == 1
    summary = snail("-S", "headline=%s", "-H", "-f", str(server.mail_dir))
    assert summary.returncode == 0, summary.stderr
    assert summary.stdout.decode().strip() == SUBJECT
    assert summary.stderr == b""
    body = snail("-#", "-Y", "type 1", "-Y", "xit", "-f", str(server.mail_dir))
    assert body.stderr == b""
    assert b"\r" not in body.stdout and "\u240d".encode() not in body.stdout
    assert b"\nline one\nline two\n" in body.stdout
