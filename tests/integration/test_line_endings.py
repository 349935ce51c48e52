"""Files saved with LF line endings, sent as they are, and what the Maildir holds.

As a new user sends them: curl --upload-file sends the file's bytes and ends with
CRLF "." CRLF; smtplib's sendmail with bytes stuffs a dot at every line start (after any
LF) and adds CRLF "." CRLF. Under limits.bare_lf normalize (the default) both are stored,
with LF line ends (delivery.line_endings lf, the default); under reject both are refused.
"""

from __future__ import annotations

import smtplib
import subprocess
import sys
import tempfile
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path

import pytest
import yaml

from minismtp.smtp import replies

LF_FILE = (b"From: user@example.org\nTo: rcpt@example.org\nSubject: saved with LF\n\n"
           b"line one\n.a line that starts with a dot\n.\nlast line\n")


def _send_lf_file(client, body: bytes = LF_FILE):
    """What curl --upload-file does with an LF file: its bytes, then CRLF "." CRLF (it
    stuffs dots only after CRLF, so none here)."""
    client.hello()
    client.send(client.envelope("user@example.org", ["rcpt@example.org"]))
    assert [r.code for r in client.replies(3)] == [250, 250, 354]
    client.send(body + b"\r\n.\r\n")
    return client.reply()


def test_lf_file_is_stored_with_lf_line_ends(make_server, raw_clients):
    server = make_server()  # bare_lf normalize, line_endings lf: the defaults
    client = raw_clients(server.port)
    reply = _send_lf_file(client)
    assert reply.code == 250, reply
    client.cmd("QUIT", 221)
    [(key, stored)] = server.maildir_messages()
    assert key.startswith(reply.queue_id + ".")
    # Each line as sent, a dot after an LF unstuffed like any other (curl did not stuff
    # here, so ".a line" loses its dot and "." is an empty line); the CRLF before the
    # final "." ends one more, empty line.
    assert stored.endswith(b"\nFrom: user@example.org\nTo: rcpt@example.org\n"
                           b"Subject: saved with LF\n\nline one\na line that starts with a "
                           b"dot\n\nlast line\n\n")
    assert b"\r" not in stored


def test_lf_commands_are_commands(make_server, raw_clients):
    server = make_server()
    client = raw_clients(server.port)
    client.expect(220)
    client.send(b"EHLO client.test\nMAIL FROM:<a@example.org>\nRCPT TO:<b@example.org>\n"
                b"DATA\n")
    assert client.reply().code == 250
    assert [r.raw for r in client.replies(3)] == [
        replies.SENDER_OK.wire, replies.RECIPIENT_OK.wire, replies.START_INPUT.wire]
    client.send(b"Subject: lf\n\nhi\n\r\n.\r\nQUIT\n")
    assert client.reply().code == 250
    assert client.reply().raw == replies.CLOSING.wire
    [(_, stored)] = server.maildir_messages()
    assert stored.endswith(b"\nSubject: lf\n\nhi\n\n")


def test_lf_file_is_refused_under_reject(make_server, raw_clients):
    server = make_server({"limits": {"bare_lf": "reject"}})
    client = raw_clients(server.port)
    assert _send_lf_file(client).raw == replies.BARE_LF_DATA.wire
    client.send(b"NOOP\n")
    assert client.reply().raw == replies.BARE_LF_COMMAND.wire
    client.cmd("QUIT", 221)
    assert server.maildir_messages() == [] and server.files("tmp") == []


def test_smtplib_sendmail_with_lf_bytes(make_server):
    server = make_server()
    msg = EmailMessage(policy=default_policy)  # as_bytes() ends its lines in LF
    msg["From"], msg["To"], msg["Subject"] = "a@example.org", "b@example.org", "LF bytes"
    msg.set_content("caf\u00e9\n.dotted\n..two dots\n.\nend\n")
    raw = msg.as_bytes()
    assert b"\r" not in raw and b"\n.dotted\n" in raw
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
        assert smtp.sendmail("a@example.org", ["b@example.org"], raw) == {}
    [(_, stored)] = server.maildir_messages()
    # smtplib stuffed every line start and the server unstuffed them: the bytes come
    # back, plus the empty line smtplib's CRLF before "." makes after a final LF.
    assert stored.endswith(b"\n" + raw + b"\n")
    assert b"\r" not in stored


def test_crlf_line_endings_keep_the_wire_form(make_server, raw_clients):
    server = make_server({"delivery": {"line_endings": "crlf"}})
    client = raw_clients(server.port)
    assert _send_lf_file(client).code == 250
    [(_, stored)] = server.maildir_messages()
    assert stored.startswith(b"Return-Path: <user@example.org>\r\n")
    assert stored.endswith(b"\r\nline one\r\na line that starts with a dot\r\n\r\n"
                           b"last line\r\n\r\n")


def test_envelope_recipients_all_names_every_recipient(make_server, raw_clients):
    server = make_server({"delivery": {"envelope_recipients": "all", "file_mode": "0640"}})
    client = raw_clients(server.port)
    client.hello()
    client.send_message(b"Subject: two\r\n\r\nhi\r\n", recipients=("b@x.example", "c@x.example"))
    [path] = server.files("new")
    assert b"Delivered-To: b@x.example\nDelivered-To: c@x.example\n" in path.read_bytes()
    assert path.stat().st_mode & 0o777 == 0o640


# --- check-config on delivery.group and server.user -------------------------------------

def _check_config(tmp_path: Path, document: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "check.yaml"
    path.write_text(yaml.safe_dump(document))
    return subprocess.run([sys.executable, "-m", "minismtp", "check-config", "--config",
                           str(path)], capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


def test_check_config_names_a_missing_group(tmp_path):
    result = _check_config(tmp_path, {"delivery": {"path": str(tmp_path / "mail"),
                                                   "group": "no-such-group-here"}})
    assert result.returncode == 2
    assert result.stderr == 'minismtp: delivery.group: no such group "no-such-group-here"\n'
    assert result.stdout == ""


def test_check_config_says_when_the_user_cannot_reach_the_path(tmp_path):
    import pwd

    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    # Under the system's temporary directory (searchable by all), not pytest's own
    # (private to this user, so it would be the first obstacle).
    private = Path(tempfile.mkdtemp(prefix="minismtp-private-"))  # mode 0700
    try:
        if private.stat().st_uid == pwd.getpwnam("nobody").pw_uid:
            pytest.skip("running as nobody")
        path = private / "mail"
        document = {"server": {"user": "nobody"}, "delivery": {"path": str(path)}}
        result = _check_config(tmp_path, document)
        assert result.returncode == 2
        assert result.stderr == (
            f'minismtp: delivery.path: server.user "nobody" cannot reach "{path}": '
            f'"{private}" is mode 0700, owner {private.stat().st_uid}, group '
            f"{private.stat().st_gid}\n")
        private.chmod(0o711)  # searchable is enough: the master makes and hands over the rest
        assert _check_config(tmp_path, document).returncode == 0
    finally:
        private.rmdir()
