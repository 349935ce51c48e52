"""Delivery through a real server: write failures and hostile per-recipient paths."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
from pathlib import Path

import pytest

from minismtp.smtp import replies

FSIZE_LIMIT = 256 * 1024


def _limit_file_size() -> None:
    # Python starts with SIGXFSZ ignored, so a write past the limit fails with EFBIG.
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))


def test_write_failure_answers_451_and_leaves_nothing(make_server, raw_clients):
    server = make_server({"server": {"workers": 1}}, preexec_fn=_limit_file_size)
    client = raw_clients(server.port)
    client.hello()
    big = b"Subject: big\r\n\r\n" + (b"z" * 1022 + b"\r\n") * 1024  # 1 MiB
    reply = client.send_message(big)
    assert reply.raw == replies.LOCAL_ERROR.wire
    assert server.files("new") == [] and server.files("tmp") == []
    server.wait_for_log(r"result=451 local error")
    # Nothing about the failure reaches the client but the 451; the session goes on.
    small = b"Subject: small\r\n\r\nfits\r\n"
    queue_id = client.send_message(small).queue_id
    client.cmd("QUIT", 221)
    [(key, stored)] = server.maildir_messages()
    assert key.startswith(queue_id + ".") and stored.endswith(server.stored_form(small))
    assert server.files("tmp") == []


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 1 MiB tmpfs mounted for the test (root only: skipped where mount is refused)."""
    point = tmp_path / "tiny"
    point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs",
                              str(point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=True)


def test_a_full_disk_answers_452_and_leaves_nothing(make_server, raw_clients, tiny_disk):
    server = make_server({"server": {"workers": 1},
                          "delivery": {"path": str(tiny_disk / "mail")}})
    client = raw_clients(server.port)
    client.hello()
    big = b"Subject: big\r\n\r\n" + (b"y" * 1022 + b"\r\n") * 2048  # 2 MiB
    assert client.send_message(big).raw == replies.STORAGE_FULL.wire
    assert server.files("new") == [] and server.files("tmp") == []
    server.wait_for_log(r"No space left on device")
    server.wait_for_log(r"result=452 storage full")
    # The space is back once the file is gone: the next message is stored.
    small = b"Subject: small\r\n\r\nfits\r\n"
    queue_id = client.send_message(small).queue_id
    client.cmd("QUIT", 221)
    [(key, _)] = server.maildir_messages()
    assert key.startswith(queue_id + ".")
    server.stop()


HOSTILE = {
    # recipient: the RCPT reply expected
    '"../../etc"@x': replies.RECIPIENT_OK,
    "a/b@c": replies.RECIPIENT_OK,
    '"../../etc"@x.example': replies.RECIPIENT_OK,
    "a/b@c.example": replies.RECIPIENT_OK,
    '"a@b"@../..': replies.BAD_RECIPIENT,
    '"/etc/passwd"@x.example': replies.RECIPIENT_OK,
    '"..\\/.."@x.example': replies.RECIPIENT_OK,
    "x@..": replies.BAD_RECIPIENT,
    "..@..": replies.BAD_RECIPIENT,
    ".@tmp": replies.RECIPIENT_OK,
    "..@new": replies.RECIPIENT_OK,
    "postmaster": replies.RECIPIENT_OK,
}


def test_per_recipient_paths_stay_inside_delivery_path(make_server, raw_clients, tmp_path):
    root = tmp_path / "spool" / "deep" / "mail"
    server = make_server({"delivery": {"layout": "per_recipient", "path": str(root)}})
    client = raw_clients(server.port)
    client.hello()
    stored_ids = []
    for rcpt, expected in HOSTILE.items():
        client.cmd("MAIL FROM:<hostile@example.org>", 250, "2.1.0")
        client.send(f"RCPT TO:<{rcpt}>\r\n".encode())
        assert client.reply().raw == expected.wire, rcpt
        if expected is not replies.RECIPIENT_OK:
            client.cmd("RSET", 250, "2.0.0")
            continue
        client.cmd("DATA", 354)
        client.send(client.stuff(f"Subject: {rcpt}\r\n\r\nfor {rcpt}\r\n".encode()))
        stored_ids.append((rcpt, client.reply().queue_id))
    # One message for all of them at once, too: one copy per mailbox.
    accepted = [r for r, e in HOSTILE.items() if e is replies.RECIPIENT_OK]
    everyone = client.send_message(b"Subject: all\r\n\r\nall of you\r\n",
                                   recipients=tuple(accepted)).queue_id
    client.cmd("QUIT", 221)

    real_root = os.path.realpath(root) + os.sep
    everything = [Path(dirpath) / name for dirpath, dirnames, filenames in os.walk(tmp_path)
                  for name in dirnames + filenames]
    outside = [p for p in everything
               if p != server.config_path and not os.path.realpath(p).startswith(real_root)
               and not real_root.startswith(os.path.realpath(p) + os.sep)]
    assert outside == []
    new_files = [p for p in everything if p.parent.name == "new" and p.is_file()]
    for rcpt, queue_id in stored_ids:
        copies = [p for p in new_files if p.name.startswith(queue_id + ".")]
        assert len(copies) == 1, (rcpt, copies)
        data = copies[0].read_bytes()
        assert data.endswith(server.stored_form(f"\r\n\r\nfor {rcpt}\r\n".encode()))
        assert server.stored_form(f"Delivered-To: {rcpt}\r\n".encode()) in data
        # The mailbox is a directory two levels below the root: <domain>/<local>/new/.
        mailbox = copies[0].parent.parent
        assert mailbox.parent.parent == root, copies[0]
    copies = [p for p in new_files if p.name.startswith(everyone + ".")]
    assert len(copies) == len({p.parent for p in copies}) == len(accepted)
    assert list((root / "tmp").iterdir()) == []


def test_hostile_helo_names_cannot_forge_the_received_header(make_server, raw_clients):
    # The core takes any printable HELO argument, 8-bit and spaces included; what reaches
    # the header is one ASCII token outside SMTPUTF8, UTF-8 only with it.
    server = make_server({"server": {"workers": 1}})
    client = raw_clients(server.port)
    client.expect(220)
    sent = {
        "forged": (b"EHLO evil (trusted.example [10.0.0.1]) by mx; x", b"MAIL FROM:<a@x.example>",
                   b"Received: from evil??trusted.example?[10.0.0.1]??by?mx??x ([127.0.0.1])"),
        "8-bit": ("EHLO caf\u00e9.example".encode(), b"MAIL FROM:<a@x.example>",
                  b"Received: from caf?.example ([127.0.0.1])"),
        "utf8": ("EHLO caf\u00e9.example".encode(), b"MAIL FROM:<a@x.example> SMTPUTF8",
                 "Received: from caf\u00e9.example ([127.0.0.1])".encode()),
    }
    expected = {}
    for name, (ehlo, mail, received) in sent.items():
        client.send(ehlo + b"\r\n")
        client.expect(250)
        client.send(mail + b"\r\nRCPT TO:<r@y.example>\r\nDATA\r\n")
        client.expect(250, "2.1.0")
        client.expect(250, "2.1.5")
        client.expect(354)
        client.send(client.stuff(f"Subject: {name}\r\n\r\nbody\r\n".encode()))
        expected[client.reply().queue_id] = received
    client.cmd("QUIT", 221)
    messages = server.maildir_messages()
    assert len(messages) == 3
    for key, data in messages:
        [received] = [line for queue_id, line in expected.items() if key.startswith(queue_id + ".")]
        received_line = data.split(b"\n")[2]  # after Return-Path and Delivered-To (LF)
        assert received_line == received
        if b"caf\xc3\xa9" not in received_line:
            assert data.split(b"\r\n\r\n")[0].isascii()


def test_per_recipient_mailboxes_are_made_only_for_stored_messages(make_server, raw_clients,
                                                                   tmp_path):
    root = tmp_path / "boxes"
    server = make_server({"server": {"workers": 1}, "limits": {"bare_lf": "reject"},
                          "delivery": {"layout": "per_recipient", "path": str(root)}})
    many = [f"user{i}@d{i % 7}.example" for i in range(300)]
    # Two transactions with many fresh recipients that never end in a stored message:
    # the client leaves mid-body; the body is refused (a bare LF).
    for rest, reply in ((b"x" * 1000 + b"\r\n", None),
                        (b"bare\nLF\r\n.\r\n", replies.BARE_LF_DATA)):
        client = raw_clients(server.port)
        client.hello()
        client.send(client.envelope("s@x.example", many))
        client.expect(250, "2.1.0")
        client.replies(len(many))
        client.expect(354)
        client.send(b"Subject: never stored\r\n\r\n" + rest)
        if reply is not None:
            assert client.reply().raw == reply.wire
        client.close()
    client = raw_clients(server.port)
    client.hello()
    queue_id = client.send_message(b"Subject: kept\r\n\r\nkept\r\n", recipients=(
        "a@one.example", "b@one.example", "c@two.example")).queue_id
    client.cmd("QUIT", 221)
    boxes = ["one.example/a", "one.example/b", "two.example/c"]
    directories = sorted(str(Path(d).relative_to(root) / n)
                         for d, names, _ in os.walk(root) for n in names)
    assert directories == sorted(["tmp", "one.example", "two.example", *boxes,
                                  *(f"{b}/{s}" for b in boxes for s in ("cur", "new", "tmp"))])
    for box in boxes:
        [copy] = list((root / box / "new").iterdir())
        assert copy.name.startswith(queue_id + ".")
    server.wait_until(lambda: not list((root / "tmp").iterdir()), 5,
                      message="the abandoned bodies' tmp files removed")


def test_cannot_store_names_the_path_that_failed(make_server, raw_clients):
    server = make_server({"server": {"workers": 1}})
    (server.mail_dir / "new").rmdir()  # the link into new/ fails; tmp/ is fine
    client = raw_clients(server.port)
    client.hello()
    assert client.send_message(b"Subject: x\r\n\r\nx\r\n").raw == replies.LOCAL_ERROR.wire
    m = server.wait_for_log(r'cannot store message from 127\.0\.0\.1: delivery: storing "(.*)": '
                            r"No such file or directory")
    assert m.group(1).startswith(str(server.mail_dir / "new") + os.sep)
    assert server.files("tmp") == []


def test_a_start_removes_what_a_service_killed_mid_data_left(make_server, raw_clients):
    """Master and workers all SIGKILLed (OOM, a stop timeout): no master lives to sweep
    after its worker, so the next start removes the half-written file."""
    server = make_server({"server": {"workers": 1}})
    client = raw_clients(server.port)
    client.hello()
    client.cmd("MAIL FROM:<a@example.org>", 250)
    client.cmd("RCPT TO:<b@example.net>", 250)
    client.cmd("DATA", 354)
    client.send(b"Subject: partial\r\n\r\n" + b"p" * 50000)
    server.wait_until(lambda: server.files("tmp"), 5, message="the file in tmp/")
    workers = server.worker_pids()
    os.kill(server.pid, signal.SIGKILL)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    server.wait(5)
    server.wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in workers), 5,
                      message="the workers to be gone")
    [half] = server.files("tmp")
    again = make_server({"server": {"workers": 1}})
    assert not half.exists() and again.files("new") == []
    again.wait_for_log(r"removed 1 unfinished message file\(s\) of stopped workers from ")
