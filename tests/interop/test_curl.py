"""curl's SMTP client (`--upload-file`) against a real minismtp.

curl sends the file's lines as they are: it dot-stuffs a dot after CRLF and ends the data
with CRLF, dot, CRLF, adding the first CRLF only when the file does not end with one.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from support.messages import expect_lf_stored, expect_stored, stored_file, text_message

pytestmark = pytest.mark.neighbour("curl")

QUEUED = re.compile(r"^< 250 2\.0\.0 Ok: queued as (\S+)$", re.M)


def curl(port: int, path: Path) -> subprocess.CompletedProcess:
    cmd = ["curl", "--silent", "--show-error", "--verbose", "--max-time", "60",
           "--url", f"smtp://127.0.0.1:{port}", "--mail-from", "sender@example.org",
           "--mail-rcpt", "rcpt@example.org", "--upload-file", str(path)]
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          errors="replace", timeout=90)


def uploaded(server, path, message: bytes) -> str:
    """`message` written to `path` and sent with curl, which must exit 0 having read a
    queued reply: its queue id."""
    path.write_bytes(message)
    result = curl(server.port, path)
    assert result.returncode == 0, result.stderr[-3000:]
    [qid] = QUEUED.findall(result.stderr)
    return qid


def test_crlf_file_stored_byte_for_byte(server, tmp_path):
    """A CRLF file, dot-led line included, goes through curl with exit status 0 and a
    queued reply, and is stored byte for byte."""
    message = text_message("curl upload", "first\n.dot-led line\nlast\n")
    qid = uploaded(server, tmp_path / "msg.eml", message)
    expect_stored(stored_file(server.mail_dir, qid), message)


def test_lf_file_is_stored_with_lf_endings(server, tmp_path):
    """A file with LF-only lines, sent by curl as it is, is accepted with the server's
    default settings and stored readable, with LF endings. (Without a dot-led line:
    curl stuffs dots only after CRLF.)"""
    message = text_message("curl lf upload", "first\nsecond\nlast\n").replace(b"\r\n", b"\n")
    assert b"\r" not in message
    qid = uploaded(server, tmp_path / "msg-lf.eml", message)
    expect_lf_stored(stored_file(server.mail_dir, qid), message)
