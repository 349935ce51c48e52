"""Dovecot's IMAP server reading minismtp's Maildir, as a mail user would get the
messages: minismtp's workers run as an unprivileged user (`server.user`) who owns the
Maildir, and Dovecot opens it as that user."""

from __future__ import annotations

import pwd
import re
import smtplib

import pytest

from support.dovecot import MAIL_USER
from support.messages import expect_stored, text_message

pytestmark = pytest.mark.neighbour("dovecot")

RECIPIENT = "reader@example.org"


def crlf(raw: bytes) -> bytes:
    """A stored file as IMAP serves it: CRLF lines (RFC 3501), whichever it has on disk."""
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@pytest.mark.parametrize("layout", ["single", "per_recipient"])
def test_imap_fetches_the_stored_message(make_server, shared_tmp, dovecot, layout):
    """A message minismtp stored (workers running as `nobody`, the Maildir theirs) is
    listed and fetched through Dovecot: LIST shows INBOX, SELECT counts one message, and
    FETCH BODY.PEEK[] returns exactly the stored file (trace headers, then the message
    as sent, byte for byte), without marking it \\Seen. With `per_recipient` Dovecot's
    mail_location is <path>/<domain>/<local-part>."""
    root = shared_tmp / "mail"
    if layout == "per_recipient":
        # Works around the bug pinned by test_per_recipient_root_with_server_user below.
        for sub in ("new", "cur"):
            (root / sub).mkdir(parents=True)
    server = make_server({"server": {"user": MAIL_USER},
                          "delivery": {"path": str(root), "layout": layout}})
    message = text_message(f"imap {layout}", "Hello over IMAP.\n.dot-led line\n",
                           recipient=RECIPIENT)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
        assert smtp.sendmail("sender@example.org", [RECIPIENT], message) == {}
    maildir = root if layout == "single" else root / "example.org" / "reader"
    [(_, stored)] = server.maildir_messages(root=maildir)
    [path] = server.files("new", root=maildir)
    assert path.stat().st_uid == dovecot_uid()
    expect_stored(stored, message)

    imap = dovecot(maildir).login()
    try:
        typ, listed = imap.list()
        assert typ == "OK" and any(re.search(rb' "?INBOX"?$', m) for m in listed), listed
        typ, count = imap.select("INBOX")
        assert (typ, count) == ("OK", [b"1"])
        typ, data = imap.fetch("1", "(BODY.PEEK[] FLAGS)")
        assert typ == "OK", data
        fetched = data[0][1]
        assert fetched == crlf(stored)
        expect_stored(fetched, message)
        typ, flags = imap.fetch("1", "(FLAGS)")
        assert b"\\Seen" not in flags[0], flags
    finally:
        imap.logout()


def test_per_recipient_root_with_server_user(make_server, shared_tmp):
    """Started as root with `server.user` and `layout: per_recipient` on a new path,
    minismtp starts and hands the root (and its tmp/) to that user, as it does for
    `single`. Today it fails to start: "No such file or directory: .../new"."""
    root = shared_tmp / "fresh"
    server = make_server({"server": {"user": MAIL_USER},
                          "delivery": {"path": str(root), "layout": "per_recipient"}},
                         start=False)
    server.start(timeout=5)  # the failure is at once; no need to wait the usual 15 s
    assert root.stat().st_uid == dovecot_uid() == (root / "tmp").stat().st_uid
    assert server.proc is not None and server.proc.poll() is None


def dovecot_uid() -> int:
    return pwd.getpwnam(MAIL_USER).pw_uid
