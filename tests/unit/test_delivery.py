"""Delivery backends against real files: Maildir (both layouts) and discard."""

from __future__ import annotations

import errno
import mailbox
import os
import socket
import stat
import time
from email.parser import BytesParser
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from minismtp.delivery import (
    Backend, DeliveryError, Peer, Sink, make_backend,
)
from minismtp.delivery import maildir, untrusted
from minismtp.delivery.maildir import MaildirBackend, clean_tmp
from minismtp.delivery.untrusted import mailbox_parts
from minismtp.delivery.null import DiscardBackend
from minismtp.smtp.events import Envelope

PEER = Peer("192.0.2.7", 40123)
HOST = "mx.example.net"
BODY = (
    b"From: a@example.org\r\nSubject: caf\xc3\xa9 \xff\xfe\r\n\r\n"
    b".leading dot stays unstuffed\r\n..two dots\r\n\r\n"
    b"8-bit: \x80\x81\xe9\r\n" + b"x" * 5000 + b"\r\n.\r\nnot the end\r\n"
)


def envelope(*recipients: str, helo: str = "client.example", sender: str = "a@example.org",
             esmtp: bool = True, smtputf8: bool = False) -> Envelope:
    return Envelope(helo=helo, esmtp=esmtp, sender=sender,
                    recipients=recipients or ("b@example.net",), smtputf8=smtputf8)


def backend(tmp_path: Path, layout: str = "single", fsync: bool = True,
            **options: object) -> MaildirBackend:
    """A prepared Maildir backend; most tests here look at the wire form of the file and
    at every recipient, so crlf and all unless `options` say otherwise."""
    options = {"line_endings": "crlf", "envelope_recipients": "all", **options}
    b = make_backend("maildir", str(tmp_path / "mail"), fsync, layout, HOST, **options)
    assert isinstance(b, MaildirBackend)
    b.prepare()
    return b


def write_in_segments(sink: Sink, body: bytes = BODY) -> None:
    """Feed the body as views borrowed from one buffer, at uneven split points."""
    buf = bytearray(body)
    view = memoryview(buf)
    pos, step = 0, 1
    while pos < len(buf):
        sink.write(view[pos:pos + step])
        pos += step
        step = step * 3 % 997 + 1
    view.release()
    buf[:] = b"resized"  # BufferError if the sink still held a view of the buffer


def deliver(b: Backend, env: Envelope | None = None, body: bytes = BODY) -> str:
    sink = b.open(env or envelope(), PEER)
    write_in_segments(sink, body)
    return sink.commit()


def files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file())


def stored(tmp_path: Path) -> bytes:
    (path,) = files(tmp_path / "mail" / "new")
    return path.read_bytes()


def split_headers(data: bytes) -> tuple[bytes, bytes]:
    """The trace block (up to the first line not starting a trace header) and the rest."""
    assert data.endswith(BODY)
    head = data[: len(data) - len(BODY)]
    for line in head.split(b"\r\n")[:-1]:
        assert line.startswith((b"Return-Path: ", b"Delivered-To: ", b"Received: ", b"\t"))
    return head, data[len(head):]


# --- stored content ----------------------------------------------------------------------


def test_file_is_trace_headers_then_exact_body(tmp_path: Path) -> None:
    b = backend(tmp_path)
    queue_id = deliver(b, envelope("b@example.net", "c@example.com"))
    data = stored(tmp_path)
    head, body = split_headers(data)
    assert body == BODY
    assert head.endswith(b"\r\n") and b"\n" not in head.replace(b"\r\n", b"")
    msg = BytesParser().parsebytes(data)
    assert msg["Return-Path"] == "<a@example.org>"
    assert msg.get_all("Delivered-To") == ["b@example.net", "c@example.com"]
    received = " ".join(msg["Received"].split())
    assert received.startswith("from client.example ([192.0.2.7]) by mx.example.net (minismtp)")
    assert f"with ESMTP id {queue_id};" in received
    assert " for " not in received  # two recipients: no "for" clause
    assert msg["Subject"] is not None and len(msg.get_all("Received")) == 1


@pytest.mark.parametrize("line_endings", ["crlf", "lf"])
@pytest.mark.parametrize("first", [b" ", b"\t"])
def test_a_first_line_that_folds_cannot_continue_our_received(
        tmp_path: Path, line_endings: str, first: bytes) -> None:
    """A message whose first line begins with a space or tab would continue our last
    trace header (RFC 5322 2.2.3 folding), the client's text inside our Received: an
    empty line goes first (as Postfix writes), and the client's text is body."""
    b = backend(tmp_path, line_endings=line_endings)
    sink = b.open(envelope("b@example.net"), PEER)
    sink.write(b"")  # an empty piece first changes nothing
    sink.write(first + b"(Authenticated sender: ceo@example.net)\r\nSubject: x\r\n\r\nhi\r\n")
    sink.commit()
    data = stored(tmp_path)
    eol = b"\n" if line_endings == "lf" else b"\r\n"
    head, _, body = data.partition(eol + eol)
    assert body == first + b"(Authenticated sender: ceo@example.net)" + eol + b"Subject: x" \
        + eol + eol + b"hi" + eol
    msg = BytesParser().parsebytes(data)
    assert "Authenticated" not in msg["Received"] and msg["Subject"] is None


FIRST_LINES = [
    # (the message as sent, whether it begins with a header field or the empty line)
    (b"Subject: x\r\n\r\nhi\r\n", True),
    (b"X-Odd-But-Valid!#$%&'*+-/=?^_`{|}~: y\r\n\r\nhi\r\n", True),
    (b"Subject : x\r\n\r\nhi\r\n", True),  # obsolete syntax: blanks before the colon
    (b"\r\nno header at all\r\n", True),  # the empty line that ends the header
    (b"Hello world, no headers here\r\nsecond line\r\n", False),
    (b"From alice@example.org Mon Dec  7 00:00:00 2026\r\nSubject: x\r\n", False),
    (b": no name\r\n", False),
    (b"NoColonAtAll\r\n", False),
    (b"\rSubject: x\r\n", False),  # a bare CR is no empty line
    (b"\xc3\xa9t\xc3\xa9: x\r\n", False),  # not a field name: 8-bit
    (b"x" * 1200 + b": long\r\n", False),  # longer than any header line
]


@pytest.mark.parametrize(("message", "header"), FIRST_LINES,
                         ids=[str(i) for i in range(len(FIRST_LINES))])
def test_a_first_line_that_is_no_header_field_follows_an_empty_line(
        tmp_path: Path, message: bytes, header: bool) -> None:
    """As Postfix writes: unless the message begins with a header field (or the empty
    line that ends the header section), an empty line goes first, so that a message
    without a header is not read as part of ours. However the body is cut in pieces."""
    for cut in sorted({1, 2, 3, 7, len(message) // 2, len(message) - 1, len(message)}):
        directory = tmp_path / str(cut)
        b = backend(directory)
        sink = b.open(envelope("b@example.net"), PEER)
        for start in range(0, len(message), cut):
            sink.write(memoryview(message)[start:start + cut])
        sink.commit()
        data = stored(directory)
        received_end = data.index(b"\r\n", data.index(b"Received: "))
        while data[received_end + 2:received_end + 3] in (b" ", b"\t"):  # its folded lines
            received_end = data.index(b"\r\n", received_end + 2)
        after = data[received_end + 2:]
        assert after == (message if header else b"\r\n" + message), cut


def test_a_body_ending_inside_what_looks_like_a_field_name_is_body(tmp_path: Path) -> None:
    b = backend(tmp_path)
    sink = b.open(envelope("b@example.net"), PEER)
    sink.write(b"Subject")  # no line end ever comes (the core always sends one)
    sink.commit()
    assert stored(tmp_path).endswith(b"\r\n\r\nSubject")


def test_a_first_header_line_is_written_as_it_came(tmp_path: Path) -> None:
    b = backend(tmp_path)
    sink = b.open(envelope("b@example.net"), PEER)
    sink.write(memoryview(b"Subject: x\r\n\tcontinued\r\n\r\nhi\r\n"))
    sink.commit()
    head, sent = stored(tmp_path).split(b"Subject: x", 1)
    assert head.startswith(b"Return-Path: ") and b"\r\n\r\n" not in head  # no empty line
    assert sent == b"\r\n\tcontinued\r\n\r\nhi\r\n"


def test_received_for_one_recipient_and_date(tmp_path: Path) -> None:
    b = backend(tmp_path)
    before = time.time()
    queue_id = deliver(b, envelope("only@example.net", sender=""))
    msg = BytesParser().parsebytes(stored(tmp_path))
    assert msg["Return-Path"] == "<>"
    received = " ".join(msg["Received"].split())
    assert f"id {queue_id} for <only@example.net>; " in received
    when = parsedate_to_datetime(received.rpartition("; ")[2])
    assert before - 2 <= when.timestamp() <= time.time() + 1
    assert when.tzinfo is not None


def test_received_for_postmaster_names_a_mailbox(tmp_path: Path) -> None:
    """RCPT TO:<postmaster> has no domain; "for" takes a mailbox (RFC 5321 4.4): ours."""
    deliver(backend(tmp_path), envelope("postmaster"))
    msg = BytesParser().parsebytes(stored(tmp_path))
    assert " for <postmaster@mx.example.net>; " in " ".join(msg["Received"].split())
    assert msg["Delivered-To"] == "postmaster"


@pytest.mark.parametrize(("esmtp", "smtputf8", "word"), [
    (False, False, "SMTP"), (True, False, "ESMTP"), (True, True, "UTF8SMTP"),
])
def test_received_protocol(tmp_path: Path, esmtp: bool, smtputf8: bool, word: str) -> None:
    deliver(backend(tmp_path), envelope(esmtp=esmtp, smtputf8=smtputf8))
    received = BytesParser().parsebytes(stored(tmp_path))["Received"]
    assert f" with {word} id " in " ".join(received.split())


TLS = "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"


@pytest.mark.parametrize(("esmtp", "smtputf8", "word"), [
    (False, False, "SMTP"), (True, False, "ESMTPS"), (True, True, "UTF8SMTPS"),
])
def test_received_over_tls(tmp_path: Path, esmtp: bool, smtputf8: bool, word: str) -> None:
    env = Envelope(helo="client.example", esmtp=esmtp, sender="a@example.org",
                   recipients=("b@example.net",), smtputf8=smtputf8, tls=TLS)
    queue_id = deliver(backend(tmp_path), env)
    data = stored(tmp_path)
    assert (b"Received: from client.example ([192.0.2.7])\r\n"
            b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n"
            b"\tby mx.example.net (minismtp) with %s id %s\r\n" % (
                word.encode(), queue_id.encode())) in data
    split_headers(data)


def test_received_tls_text_is_cleaned(tmp_path: Path) -> None:
    env = Envelope(helo="c", esmtp=True, sender="", recipients=("b@example.net",),
                   tls="TLSv1.3\r\nX-Injected: 1")
    deliver(backend(tmp_path), env)
    assert b"\t(using TLSv1.3??X-Injected: 1)\r\n" in stored(tmp_path)


def test_ipv6_peer_is_an_address_literal(tmp_path: Path) -> None:
    b = backend(tmp_path)
    sink = b.open(envelope(), Peer("::1", 1))
    sink.commit()
    assert b"from client.example ([IPv6:::1])\r\n" in stored(tmp_path)


@pytest.mark.parametrize("field", ["helo", "sender", "rcpt"])
def test_hostile_envelope_cannot_inject_header(tmp_path: Path, field: str) -> None:
    evil = "x\r\nX-Evil: 1\n\rX-Evil: 2\x00\x0bX-Evil: 3\u2028X-Evil: 4"
    env = envelope(
        evil if field == "rcpt" else "b@example.net",
        helo=evil if field == "helo" else "client.example",
        sender=evil if field == "sender" else "a@example.org",
    )
    deliver(backend(tmp_path), env)
    data = stored(tmp_path)
    msg = BytesParser().parsebytes(data)
    assert msg["X-Evil"] is None
    head, _ = split_headers(data)
    assert b"\r\nX-Evil" not in head and b"\nX-Evil" not in head and b"\rX-Evil" not in head


def test_bytes_that_were_not_utf8_never_reach_a_header(tmp_path: Path) -> None:
    rcpt = b"j\xc3\xb6rg\xff@example.net".decode("utf-8", "surrogateescape")
    deliver(backend(tmp_path), envelope(rcpt, smtputf8=True))
    assert b"Delivered-To: j\xc3\xb6rg?@example.net\r\n" in stored(tmp_path)


def received_from_line(tmp_path: Path) -> bytes:
    head, _ = split_headers(stored(tmp_path))
    return next(line for line in head.split(b"\r\n") if line.startswith(b"Received: "))


@pytest.mark.parametrize(("helo", "smtputf8", "shown"), [
    ("client.example", False, b"client.example"),
    ("[192.0.2.1]", False, b"[192.0.2.1]"),
    ("[IPv6:2001:db8::1]", False, b"[IPv6:2001:db8::1]"),
    ("my_host-1.example", False, b"my_host-1.example"),
    # a forged hop: spaces and parentheses would make a second "from ... (...)"
    ("evil (trusted.example [10.0.0.1]) by mx.example.net", False,
     b"evil??trusted.example?[10.0.0.1]??by?mx.example.net"),
    ("x;Mon, 1 Jan 2024 00:00:00 +0000", False, b"x?Mon??1?Jan?2024?00:00:00??0000"),
    ("a)b(c\"d<e>f\\g", False, b"a?b?c?d?e?f?g"),
    ("caf\u00e9.example", False, b"caf?.example"),  # not SMTPUTF8: ASCII only
    ("caf\u00e9.example", True, "caf\u00e9.example".encode()),
    ("caf\u00e9\u00a0(x)\ufeff", True, "caf\u00e9??x??".encode()),  # no-break space, BOM
    ("\u2028\x85\x00", True, b"???"),
    ("(", False, b"?"),
    # past a domain's 255 octets (the command line limit can be raised): cut there, on
    # a character's edge, so that the header line stays within RFC 5322's 998
    ("h" * 5000, False, b"h" * 255),
    ("\u00e9" * 200, True, "\u00e9".encode() * 127),
])
def test_helo_name_cannot_fake_trace_structure(tmp_path: Path, helo: str, smtputf8: bool,
                                               shown: bytes) -> None:
    deliver(backend(tmp_path), envelope(helo=helo, smtputf8=smtputf8))
    assert received_from_line(tmp_path) == b"Received: from " + shown + b" ([192.0.2.7])"


@pytest.mark.parametrize(("address", "smtputf8", "shown"), [
    ("a@example.org", False, "a@example.org"),
    ("o'hara+tag/x=y@[192.0.2.1]", False, "o'hara+tag/x=y@[192.0.2.1]"),
    ('"john doe (x); <y>"@example.org', False, '"john doe (x); <y>"@example.org'),
    ('"a\\"b"@example.org', False, '"a\\"b"@example.org'),  # escaped quote kept whole
    ("a(b)c;d,e@example.org", False, "a?b?c?d?e@example.org"),
    ('a"b@example.org', False, "a?b@example.org"),  # a stray quote cannot open a string
    ('"unclosed\\"@example.org', False, "?unclosed??@example.org"),
    ("j\u00f6rg@example.org", False, "j?rg@example.org"),
    ("j\u00f6rg@example.org", True, "j\u00f6rg@example.org"),
    ('"\u00f6 \u00a0"@example.org', True, '"\u00f6 ?"@example.org'),
])
def test_addresses_keep_the_shape_of_a_mailbox(tmp_path: Path, address: str, smtputf8: bool,
                                               shown: str) -> None:
    deliver(backend(tmp_path), envelope(address, sender=address, smtputf8=smtputf8))
    head, _ = split_headers(stored(tmp_path))
    expected = shown.encode()
    assert head.startswith(b"Return-Path: <" + expected + b">\r\nDelivered-To: " + expected
                           + b"\r\nReceived: ")
    assert b"\tfor <" + expected + b">; " in head
    if not smtputf8:
        assert head.isascii()


# --- Maildir behaviour -----------------------------------------------------------------


def test_mailbox_finds_every_message_and_tmp_stays_empty(tmp_path: Path) -> None:
    b = backend(tmp_path)
    ids = []
    for i in range(200):
        ids.append(deliver(b, body=b"Subject: %d\r\n\r\nbody\r\n" % i))
        assert files(tmp_path / "mail" / "tmp") == []
    assert len(set(ids)) == 200
    for queue_id in ids:
        assert queue_id.isascii() and queue_id.isprintable() and " " not in queue_id
    box = mailbox.Maildir(str(tmp_path / "mail"), create=False)
    subjects = sorted(int(m["Subject"]) for m in box)
    assert subjects == list(range(200))
    host = untrusted.encode_host(socket.gethostname())
    names = {p.name for p in files(tmp_path / "mail" / "new")}
    assert names == {f"{queue_id}.{host}" for queue_id in ids}
    b.close()


def test_names_unique_across_backends_at_same_time(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(maildir.time, "time_ns", lambda: 1_700_000_000_123_456_000)
    one, two = backend(tmp_path), backend(tmp_path)
    ids = [deliver(one), deliver(two), deliver(one), deliver(two)]
    assert len(set(ids)) == 4
    assert all(q.startswith(f"1700000000.M123456P{os.getpid()}Q") for q in ids)
    assert len(files(tmp_path / "mail" / "new")) == 4


def test_hostname_encoding_in_file_name() -> None:
    assert untrusted.encode_host("a/b:c") == "a\\057b\\072c"
    assert untrusted.encode_host("h\nx y") == "h\\012x\\040y"
    assert untrusted.encode_host("mx-1.example_x") == "mx-1.example_x"


def test_abort_leaves_nothing_and_is_idempotent(tmp_path: Path) -> None:
    b = backend(tmp_path)
    sink = b.open(envelope(), PEER)
    sink.write(b"partial")
    sink.abort()
    sink.abort()
    sink.write(b"ignored after abort")
    with pytest.raises(DeliveryError):
        sink.commit()
    for sub in ("tmp", "new", "cur"):
        assert files(tmp_path / "mail" / sub) == []


def test_abort_after_commit_keeps_the_message(tmp_path: Path) -> None:
    b = backend(tmp_path)
    sink = b.open(envelope(), PEER)
    sink.commit()
    sink.abort()
    assert len(files(tmp_path / "mail" / "new")) == 1


def test_short_writes_are_completed(tmp_path: Path, monkeypatch) -> None:
    real_write = os.write
    monkeypatch.setattr(maildir.os, "write", lambda fd, data: real_write(fd, data[:7]))
    deliver(backend(tmp_path))
    assert split_headers(stored(tmp_path))[1] == BODY


def test_write_failure_removes_everything(tmp_path: Path, monkeypatch) -> None:
    b = backend(tmp_path)
    real_write = os.write
    budget = [1000]

    def failing_write(fd: int, data) -> int:
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real_write(fd, data[: budget[0]])
        budget[0] -= n
        return n

    monkeypatch.setattr(maildir.os, "write", failing_write)
    sink = b.open(envelope(), PEER)
    with pytest.raises(DeliveryError) as info:
        write_in_segments(sink)
    assert "No space left" in str(info.value)
    sink.write(b"ignored")  # later writes do nothing
    with pytest.raises(DeliveryError):
        sink.commit()
    sink.abort()
    for sub in ("tmp", "new"):
        assert files(tmp_path / "mail" / sub) == []


@pytest.mark.parametrize("failing", ["fsync", "link", "dir_fsync", "close"])
def test_commit_failure_removes_everything(tmp_path: Path, monkeypatch, failing: str) -> None:
    b = backend(tmp_path)
    sink = b.open(envelope(), PEER)
    write_in_segments(sink)
    real_fsync, calls = os.fsync, []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if failing == "fsync" or (failing == "dir_fsync" and len(calls) == 2):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    def fail(*args: object) -> None:
        for arg in args:
            if isinstance(arg, int):
                real_close(arg)
        raise OSError(errno.EIO, "Input/output error")

    real_close = os.close
    monkeypatch.setattr(maildir.os, "fsync", fsync)
    if failing in ("link", "close"):
        monkeypatch.setattr(maildir.os, failing, fail)
    with pytest.raises(DeliveryError, match="Input/output error"):
        sink.commit()
    monkeypatch.undo()
    sink.abort()
    for sub in ("tmp", "new"):
        assert files(tmp_path / "mail" / sub) == []


def test_link_unsupported_falls_back_to_rename(tmp_path: Path, monkeypatch) -> None:
    b = backend(tmp_path)

    def no_link(src: str, dst: str) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(maildir.os, "link", no_link)
    queue_id = deliver(b)
    assert files(tmp_path / "mail" / "tmp") == []
    (path,) = files(tmp_path / "mail" / "new")
    assert path.name.startswith(queue_id + ".")


def test_no_fsync_still_delivers(tmp_path: Path, monkeypatch) -> None:
    b = backend(tmp_path, fsync=False)

    def no_fsync(fd: int) -> None:
        raise AssertionError("fsync called with fsync disabled")

    monkeypatch.setattr(maildir.os, "fsync", no_fsync)
    deliver(b)
    assert split_headers(stored(tmp_path))[1] == BODY


def _replace_maildir(root: Path) -> None:
    """What an operator may do under a running server: move the Maildir aside, make a
    fresh one in its place."""
    root.rename(root.with_name(root.name + ".old"))
    for sub in ("", "tmp", "new", "cur"):
        (root / sub).mkdir(mode=0o700)


def _record_fsyncs(monkeypatch) -> list[tuple[int, int]]:
    """(st_dev, st_ino) of every descriptor fsynced from now on."""
    synced: list[tuple[int, int]] = []
    fsync = os.fsync

    def recording(fd: int) -> None:
        st = os.fstat(fd)
        synced.append((st.st_dev, st.st_ino))
        fsync(fd)

    monkeypatch.setattr(maildir.os, "fsync", recording)
    return synced


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


@pytest.mark.parametrize("batch", [True, False])
def test_new_is_synced_where_the_message_was_linked_after_the_maildir_is_replaced(
        tmp_path: Path, monkeypatch, batch: bool) -> None:
    """The backend keeps new/ open between commits: once the Maildir is replaced, the
    fsync must go to the new/ the entry is in, not to the one that was moved aside."""
    b = backend(tmp_path)
    root = tmp_path / "mail"

    def commit() -> None:
        sink = b.open(envelope(), PEER)
        sink.write(BODY)
        if batch:
            [result] = b.commit_many([sink])
            assert isinstance(result, str), result
        else:
            sink.commit()

    commit()
    old_new = _identity(root / "new")
    _replace_maildir(root)
    synced = _record_fsyncs(monkeypatch)
    commit()
    assert len(files(root / "new")) == 1
    assert synced[-1] == _identity(root / "new") != old_new
    assert old_new not in synced
    synced.clear()
    commit()  # the reopened descriptor is kept, and still the right one
    assert synced[-1] == _identity(root / "new")
    b.close()


# --- per-recipient layout ----------------------------------------------------------------

HOSTILE = [
    "../../etc@x", "a/b@c", "x@../..", "..@..", ".@.", "@", "@x", "x@", "postmaster",
    "PostMaster", "nul\x00l@x", "ctl\r\n\x7f@x\ty", "back\\slash@x\\y", ".hidden@.dom",
    "a" * 600 + "@" + "b" * 600, "/abs@/etc", "x@tmp", "x@NEW", "x@_local", "\"q@t\"@x",
    "Case@Example.COM", "case@example.com", "%2E%2E@x", "\udcff\udcfe@x", "~@~",
]


def test_per_recipient_one_file_linked_into_each_mailbox(tmp_path: Path) -> None:
    b = backend(tmp_path, "per_recipient")
    queue_id = deliver(b, envelope("alice@Example.NET", "bob@example.net", "alice@example.net"))
    root = tmp_path / "mail"
    (alice,) = files(root / "example.net" / "alice" / "new")
    (bob,) = files(root / "example.net" / "bob" / "new")
    assert alice.name == bob.name and alice.name.startswith(queue_id + ".")
    assert os.path.samefile(alice, bob) and alice.stat().st_nlink == 2
    assert files(root / "tmp") == []
    assert alice.read_bytes().endswith(BODY)
    for mbox in ("alice", "bob"):
        box = mailbox.Maildir(str(root / "example.net" / mbox), create=False)
        assert len(box) == 1
        assert stat.S_IMODE((root / "example.net" / mbox).stat().st_mode) == 0o700


def tree(root: Path) -> list[str]:
    """Every directory under `root`, relative, sorted."""
    return sorted(str(Path(dirpath).relative_to(root) / name)
                  for dirpath, dirnames, _ in os.walk(root) for name in dirnames)


def test_per_recipient_makes_no_directory_before_commit(tmp_path: Path, monkeypatch) -> None:
    b = backend(tmp_path, "per_recipient")
    made: list[str] = []
    real_mkdir = os.mkdir
    monkeypatch.setattr(maildir.os, "mkdir", lambda path, mode=0o777: (
        made.append(path), real_mkdir(path, mode))[1])
    recipients = tuple(f"user{i}@d{i % 3}.example" for i in range(50))
    for _ in range(3):  # transactions abandoned before the end of their body
        sink = b.open(envelope(*recipients), PEER)
        write_in_segments(sink)
        sink.abort()
    assert made == [] and tree(tmp_path / "mail") == ["tmp"]
    assert files(tmp_path / "mail" / "tmp") == []


def test_per_recipient_commit_makes_exactly_the_mailboxes_of_its_recipients(
        tmp_path: Path, monkeypatch) -> None:
    b = backend(tmp_path, "per_recipient")
    synced: list[str] = []
    real_fsync_dir = maildir._fsync_dir
    monkeypatch.setattr(maildir, "_fsync_dir", lambda path: (
        synced.append(path.rstrip(os.sep)), real_fsync_dir(path))[1])
    queue_id = deliver(b, envelope("a@one.example", "b@one.example", "A@ONE.example",
                                   "c@two.example"))
    root = tmp_path / "mail"
    boxes = ["one.example/A", "one.example/a", "one.example/b", "two.example/c"]
    assert tree(root) == sorted(["tmp", "one.example", "two.example", *boxes,
                                 *(f"{box}/{sub}" for box in boxes for sub in ("cur", "new",
                                                                               "tmp"))])
    for box in boxes:
        (copy,) = files(root / box / "new")
        assert copy.name.startswith(queue_id + ".")
    # Each directory that gained an entry is fsynced once, then each new/ after the link.
    parents = [str(root), str(root / "one.example"), str(root / "two.example"),
               *(str(root / box) for box in boxes)]
    assert sorted(synced) == sorted(parents + [str(root / box / "new") for box in boxes])
    synced.clear()
    deliver(b, envelope("a@one.example"))  # known now: nothing made, only new/ synced
    assert synced == [str(root / "one.example" / "a" / "new")]


def test_per_recipient_syncs_a_mailbox_another_worker_made(tmp_path: Path,
                                                           monkeypatch) -> None:
    """Another worker made the mailbox and may not have synced its entries yet: this one
    syncs the parents too before its first 250 there, then no more."""
    root = tmp_path / "mail"
    os.makedirs(root / "one.example" / "a" / "new")  # the other worker's, unsynced
    for sub in ("tmp", "cur"):
        os.mkdir(root / "one.example" / "a" / sub)
    b = backend(tmp_path, "per_recipient")
    synced: list[str] = []
    real_fsync_dir = maildir._fsync_dir
    monkeypatch.setattr(maildir, "_fsync_dir", lambda path: (
        synced.append(path.rstrip(os.sep)), real_fsync_dir(path))[1])
    deliver(b, envelope("a@one.example"))
    new = str(root / "one.example" / "a" / "new")
    assert sorted(synced) == sorted([str(root), str(root / "one.example"),
                                     str(root / "one.example" / "a"), new])
    synced.clear()
    deliver(b, envelope("a@one.example"))
    assert synced == [new]


def test_per_recipient_a_mailbox_that_cannot_be_made_says_why(tmp_path: Path,
                                                              monkeypatch) -> None:
    """The disk is full: the error names that, not a sync of a directory never made."""
    b = backend(tmp_path, "per_recipient")
    real_mkdir = maildir._mkdir

    def full(path: str, *args, **kwargs) -> bool:
        if path.endswith("full.example"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(maildir, "_mkdir", full)
    with pytest.raises(DeliveryError, match="No space left on device"):
        deliver(b, envelope("a@full.example"))


def test_per_recipient_commits_off_the_loop_even_without_fsync(tmp_path: Path) -> None:
    # mkdir may wait for the disk too: the worker must commit on its commit thread.
    assert backend(tmp_path / "a", "per_recipient", fsync=False).commit_blocks is True
    assert backend(tmp_path / "b", "per_recipient", fsync=True).commit_blocks is True
    assert backend(tmp_path / "c", "single", fsync=False).commit_blocks is False
    assert backend(tmp_path / "d", "single", fsync=True).commit_blocks is True


def test_new_mailboxes_per_message_are_bounded(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(maildir, "MAX_NEW_MAILBOXES", 3)
    b = backend(tmp_path, "per_recipient")
    deliver(b, envelope("old@x.example"))
    recipients = ("old@x.example", *(f"new{i}@x.example" for i in range(5)))
    with pytest.raises(DeliveryError, match="more than 3 new mailboxes; made 3"):
        deliver(b, envelope(*recipients))
    root = tmp_path / "mail"
    assert sorted(p.name for p in (root / "x.example").iterdir()) == [
        "new0", "new1", "new2", "old"]
    assert [p for p in root.rglob("*") if p.is_file()] == [
        next((root / "x.example" / "old" / "new").iterdir())]  # only the first message
    queue_id = deliver(b, envelope(*recipients))  # the retry makes the other two
    for rcpt in recipients:
        (copy,) = [p for p in files(root / "x.example" / rcpt.split("@")[0] / "new")
                   if p.name.startswith(queue_id + ".")]
    assert files(root / "tmp") == []


def test_failed_link_names_the_path_in_new(tmp_path: Path) -> None:
    b = backend(tmp_path)
    sink = b.open(envelope(), PEER)
    write_in_segments(sink)
    (tmp_path / "mail" / "new").rmdir()  # link() into new/ now fails
    with pytest.raises(DeliveryError) as info:
        sink.commit()
    message = str(info.value)
    new_dir = str(tmp_path / "mail" / "new") + os.sep
    assert message.startswith(f'delivery: storing "{new_dir}{sink.queue_id}.')
    assert message.endswith('": No such file or directory')
    assert "/tmp/" + sink.queue_id not in message
    assert files(tmp_path / "mail" / "tmp") == []


def test_per_recipient_shared_copy_reveals_no_other_recipient(tmp_path: Path) -> None:
    # One hard-linked file serves every mailbox: listing recipients in it would show
    # each of them (Bcc included) to all the others.
    b = backend(tmp_path, "per_recipient")
    deliver(b, envelope("to@example.net", "bcc@example.net"))
    (copy,) = files(tmp_path / "mail" / "example.net" / "to" / "new")
    data = copy.read_bytes()
    assert b"bcc@example.net" not in data and b"Delivered-To" not in data
    deliver(b, envelope("solo@example.net"))
    (single,) = files(tmp_path / "mail" / "example.net" / "solo" / "new")
    assert b"Delivered-To: solo@example.net\r\n" in single.read_bytes()


def test_hostile_recipients_stay_inside_delivery_path(tmp_path: Path) -> None:
    b = backend(tmp_path, "per_recipient")
    for rcpt in HOSTILE:
        deliver(b, envelope(rcpt))
    deliver(b, envelope(*HOSTILE))
    root = os.path.realpath(tmp_path / "mail")
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            assert name not in ("", ".", "..") and "\x00" not in name
            assert os.path.realpath(os.path.join(dirpath, name)).startswith(root + os.sep)
            assert len(name.encode()) <= 255
        count += len(filenames)
    # one file per message, then one link per distinct mailbox ("postmaster" and
    # "PostMaster" share one; local parts keep their case, so "Case@" and "case@" do not)
    assert count == len(HOSTILE) + len(HOSTILE) - 1
    assert sorted(os.listdir(tmp_path)) == ["mail"]
    assert os.listdir(os.path.join(root, "tmp")) == []


def test_mailbox_parts() -> None:
    assert mailbox_parts("Joe.Q+x@Example.COM") == ("example.com", "Joe.Q+x")
    assert mailbox_parts("PostMaster") == ("_local", "postmaster")
    assert mailbox_parts("../../etc@x") == ("x", "%2E.%2F..%2Fetc")
    assert mailbox_parts("x@../..") == ("%2E.%2F..", "x")
    assert mailbox_parts("..@..") == ("%2E.", "%2E.")
    assert mailbox_parts("@") == ("%", "%")
    assert mailbox_parts("x@tmp")[0] == "%74mp"
    assert mailbox_parts("x@_local")[0] == "%5Flocal"
    long_a, long_b = mailbox_parts("a" * 300 + "1@x"), mailbox_parts("a" * 300 + "2@x")
    assert len(long_a[1]) == 200 and "~" in long_a[1] and long_a != long_b


def test_symlink_in_tree_is_refused(tmp_path: Path) -> None:
    b = backend(tmp_path, "per_recipient")
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "mail" / "evil.example").symlink_to(outside)
    sink = b.open(envelope("x@evil.example"), PEER)
    with pytest.raises(DeliveryError, match="outside delivery.path"):
        sink.commit()
    assert list(outside.iterdir()) == []
    assert files(tmp_path / "mail" / "tmp") == []


def test_removed_mailbox_is_recreated(tmp_path: Path) -> None:
    b = backend(tmp_path, "per_recipient")
    deliver(b, envelope("x@example.net"))
    sink = b.open(envelope("x@example.net"), PEER)
    for sub in ("tmp", "new", "cur"):
        for path in files(tmp_path / "mail" / "example.net" / "x" / sub):
            path.unlink()
        (tmp_path / "mail" / "example.net" / "x" / sub).rmdir()
    with pytest.raises(DeliveryError):
        sink.commit()
    deliver(b, envelope("x@example.net"))
    assert len(files(tmp_path / "mail" / "example.net" / "x" / "new")) == 1


# --- prepare() ---------------------------------------------------------------------------


def test_prepare_creates_private_directories(tmp_path: Path) -> None:
    backend(tmp_path)
    for sub in ("tmp", "new", "cur"):
        assert stat.S_IMODE((tmp_path / "mail" / sub).stat().st_mode) == 0o700
    assert files(tmp_path / "mail" / "tmp") == []  # the probe is gone


def test_prepare_cleans_stale_tmp_files(tmp_path: Path) -> None:
    b = backend(tmp_path)
    tmp = tmp_path / "mail" / "tmp"
    stale, fresh = tmp / "stale", tmp / "fresh"
    stale.write_bytes(b"old")
    fresh.write_bytes(b"new")
    (tmp / "subdir").mkdir()
    old = time.time() - 37 * 3600
    os.utime(stale, (old, old))
    os.utime(tmp / "subdir", (old, old))
    b.prepare()
    assert sorted(p.name for p in tmp.iterdir()) == ["fresh", "subdir"]
    assert clean_tmp(str(tmp_path / "mail"), max_age_s=-1) == 1  # "fresh" now counts as old


def test_prepare_refuses_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "mail"
    path.write_bytes(b"")
    b = make_backend("maildir", str(path), True, "single", HOST)
    with pytest.raises(DeliveryError, match=f'delivery.path "{path}": not a directory'):
        b.prepare()
    below = make_backend("maildir", str(path / "sub"), True, "single", HOST)
    with pytest.raises(DeliveryError, match=f'delivery.path "{path / "sub"}"'):
        below.prepare()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_prepare_refuses_an_unwritable_directory(tmp_path: Path) -> None:
    path = tmp_path / "mail"
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True)
    (path / "tmp").chmod(0o500)
    try:
        with pytest.raises(DeliveryError, match=f'delivery.path "{path}"'):
            make_backend("maildir", str(path), True, "single", HOST).prepare()
    finally:
        (path / "tmp").chmod(0o700)


def test_prepare_per_recipient_makes_shared_tmp_only(tmp_path: Path) -> None:
    backend(tmp_path, "per_recipient")
    assert sorted(os.listdir(tmp_path / "mail")) == ["tmp"]


# --- discard and the factory -------------------------------------------------------------


def test_discard_counts_and_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    b = make_backend("discard", str(tmp_path / "mail"), True, "single", HOST)
    assert isinstance(b, DiscardBackend)
    b.prepare()
    ids = []
    for _ in range(1000):
        sink = b.open(envelope(), PEER)
        write_in_segments(sink)
        ids.append(sink.commit())
    aborted = b.open(envelope(), PEER)
    aborted.write(b"xyz")
    aborted.abort()
    aborted.abort()
    b.close()
    assert len(set(ids)) == 1000
    assert all(q.isascii() and q.isprintable() and " " not in q for q in ids)
    assert (b.messages, b.nbytes) == (1000, 1000 * len(BODY))
    assert list(tmp_path.iterdir()) == []


def test_discard_ids_differ_after_fork() -> None:
    b = DiscardBackend()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write_fd, b.open(envelope(), PEER).commit().encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    child_id = os.read(read_fd, 100).decode()
    os.close(read_fd)
    os.waitpid(pid, 0)
    assert child_id.startswith(f"D{pid:x}.")
    assert b.open(envelope(), PEER).commit() != child_id


def test_make_backend_rejects_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="backend"):
        make_backend("mbox", str(tmp_path), True, "single", HOST)
    with pytest.raises(ValueError, match="layout"):
        make_backend("maildir", str(tmp_path), True, "flat", HOST)
