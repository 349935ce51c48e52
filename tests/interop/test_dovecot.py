"""Dovecot's IMAP server reading minismtp's Maildir, as a mail user would get the
messages: minismtp's workers run as an unprivileged user (`server.user`) who owns the
Maildir, and Dovecot opens it as that user."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import smtplib
import stat

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


READER_UID = 64999  # Dovecot's reader: neither minismtp's server.user nor root


def _reader_group() -> grp.struct_group:
    """A group the reader is in and minismtp's server.user is not (Debian's `mail`)."""
    own = pwd.getpwnam(MAIL_USER).pw_gid
    for name in ("mail", "adm", "users"):
        with contextlib.suppress(KeyError):
            group = grp.getgrnam(name)
            if group.gr_gid != own and MAIL_USER not in group.gr_mem:
                return group
    pytest.fail("no group to share the Maildir with")


@pytest.mark.parametrize("layout", ["single", "per_recipient"])
def test_a_reader_in_the_group_files_and_expunges(make_server, shared_tmp, dovecot, layout):
    """The README's set-up for a reader running as another user: delivery.group with
    file_mode 0660 and dir_mode 0770, the Maildir's root made the group's and
    set-group-ID (`install -d -o minismtp -g vmail -m 2770`). Dovecot, reading as a user
    in that group only, sees the message read-write, flags it deleted and expunges it
    (it moves messages and writes its own files in the Maildir: with group-read-only
    modes it shows an empty, read-only INBOX), and minismtp keeps storing after it."""
    group = _reader_group()
    root = shared_tmp / "mail"
    root.mkdir()
    os.chown(root, dovecot_uid(), group.gr_gid)
    root.chmod(0o2770)
    server = make_server({"server": {"user": MAIL_USER},
                          "delivery": {"path": str(root), "layout": layout,
                                       "group": group.gr_name, "file_mode": "0660",
                                       "dir_mode": "0770"}})
    first = text_message("shared 1", "For the group's reader.\n", recipient=RECIPIENT)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
        assert smtp.sendmail("sender@example.org", [RECIPIENT], first) == {}
    maildir = root if layout == "single" else root / "example.org" / "reader"
    [path] = server.files("new", root=maildir)
    assert (path.stat().st_gid, stat.S_IMODE(path.stat().st_mode)) == (group.gr_gid, 0o660)
    stored = path.read_bytes()  # Dovecot moves it to cur/ at once
    made = (maildir, maildir / "new", maildir / "cur")
    for directory in made + ((maildir.parent,) if layout == "per_recipient" else ()):
        st = directory.stat()
        assert st.st_gid == group.gr_gid and st.st_mode & stat.S_ISGID, directory

    imap = dovecot(maildir, ids=(READER_UID, group.gr_gid)).login()
    try:
        typ, count = imap.select("INBOX")
        assert (typ, count) == ("OK", [b"1"])
        assert imap.response("READ-WRITE")[1] != [None], "INBOX opened read-only"
        typ, data = imap.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK" and data[0][1] == crlf(stored)
        assert imap.store("1", "+FLAGS", "\\Deleted")[0] == "OK"
        assert imap.expunge()[0] == "OK"
        assert imap.select("INBOX") == ("OK", [b"0"])
    finally:
        imap.logout()
    assert server.files("new", root=maildir) == [] and server.files("cur", root=maildir) == []

    second = text_message("shared 2", "After the reader.\n", recipient=RECIPIENT)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
        assert smtp.sendmail("sender@example.org", [RECIPIENT], second) == {}
    [(_, stored)] = server.maildir_messages(root=maildir)
    expect_stored(stored, second)


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
