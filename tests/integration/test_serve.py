"""A real server over TCP: whole transactions, pipelining, many clients, connection limits."""

from __future__ import annotations

import os
import re
import smtplib
import socket
import subprocess
import sys
import threading
import time
from email.parser import BytesParser
from email.policy import compat32

import pytest

from minismtp.smtp import replies

SENDER = "alice@example.org"
RECIPIENTS = ["bob@example.net", "carol@example.com"]

# 8-bit bytes, lines that start with dots (one of them a lone dot), CRLF throughout.
BODY = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: integration\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"caf\xc3\xa9 \xe2\x82\xac \xff\xfe raw 8-bit\r\n"
    b".leading dot\r\n"
    b"..two leading dots\r\n"
    b".\r\n"
    b". \r\n"
    b"\r\n"
    b"last line\r\n"
)


def test_full_transaction_with_smtplib(make_server):
    server = make_server()
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as smtp:
        code, _ = smtp.ehlo("client.test")
        assert code == 250
        for feature in ("pipelining", "size", "8bitmime", "enhancedstatuscodes", "smtputf8"):
            assert smtp.has_extn(feature), feature
        assert smtp.esmtp_features["size"] == str(32 * 1024 * 1024)
        assert smtp.mail(SENDER, ["BODY=8BITMIME"]) == (250, b"2.1.0 Ok")
        for rcpt in RECIPIENTS:
            assert smtp.rcpt(rcpt) == (250, b"2.1.5 Ok")
        code, text = smtp.data(BODY)
        assert code == 250
        queue_id = text.decode().removeprefix("2.0.0 Ok: queued as ")
        assert queue_id != text.decode() and " " not in queue_id

    new = server.files("new")
    assert len(new) == 1 and server.files("tmp") == []
    assert new[0].name.startswith(queue_id + ".")
    stored = new[0].read_bytes()
    assert stored.endswith(server.stored_form(BODY))  # 8-bit and dots intact, LF line ends
    trace = stored[: -len(server.stored_form(BODY))]
    assert trace.startswith(b"Return-Path: <alice@example.org>\n")
    assert trace.endswith(b"\n") and b"\r" not in trace

    msg = BytesParser(policy=compat32).parsebytes(stored)
    assert msg["Return-Path"] == f"<{SENDER}>"
    # Two recipients: neither is named to the other (delivery.envelope_recipients: one).
    assert msg.get_all("Delivered-To") is None
    received = " ".join(msg["Received"].split())
    assert f"id {queue_id}" in received
    assert received.startswith("from client.test ([127.0.0.1]) by mx.test.invalid (minismtp)")
    assert msg["Subject"] == "integration"
    assert server.maildir_messages() == [(new[0].name, stored)]
    server.wait_for_log(rf"id={queue_id} peer=127\.0\.0\.1 listener=127\.0\.0\.1:0 "
                        rf"from=<{SENDER}> rcpts=2 "
                        rf"size={len(BODY)} result=250 queued")


def test_pipelined_transaction_in_one_send(make_server, raw_clients):
    server = make_server()
    client = raw_clients(server.port)
    greeting = client.expect(220)
    assert greeting.raw == replies.greeting("mx.test.invalid").wire
    body = b"Subject: pipelined\r\n\r\n.dot\r\nbody\r\n"
    client.send(
        b"EHLO pipe.test\r\n"
        b"MAIL FROM:<a@example.org>\r\n"
        b"RCPT TO:<b@example.org>\r\n"
        b"RCPT TO:<not an address>\r\n"
        b"RCPT TO:<c@example.org>\r\n"
        b"DATA\r\n" + client.stuff(body) +
        b"NOOP\r\n"
        b"MAIL FROM:<d@example.org>\r\n"
        b"RSET\r\n"
        b"RCPT TO:<e@example.org>\r\n"
        b"QUIT\r\n")
    got = client.replies(11)
    assert got[0].raw == replies.ehlo("mx.test.invalid", 32 * 1024 * 1024).wire
    assert got[1].raw == replies.SENDER_OK.wire
    assert got[2].raw == replies.RECIPIENT_OK.wire
    assert got[3].raw == replies.BAD_RECIPIENT.wire
    assert got[4].raw == replies.RECIPIENT_OK.wire
    assert got[5].raw == replies.START_INPUT.wire
    queue_id = got[6].queue_id
    assert got[7].raw == replies.OK.wire
    assert got[8].raw == replies.SENDER_OK.wire
    assert got[9].raw == replies.OK.wire
    assert got[10].raw == replies.NEED_MAIL.wire
    assert client.reply().raw == replies.CLOSING.wire
    assert client.wait_closed() == b""
    [(key, stored)] = server.maildir_messages()
    assert key.startswith(queue_id + ".")
    assert stored.endswith(server.stored_form(body))
    assert b"Delivered-To:" not in stored  # two recipients


def test_two_transactions_in_one_send(make_server, raw_clients):
    server = make_server()
    client = raw_clients(server.port)
    client.hello()
    bodies = [b"Subject: one\r\n\r\nfirst\r\n", b"Subject: two\r\n\r\n..second\r\n"]
    wire = b"".join(client.envelope("s@example.org", ["r@example.org"]) + client.stuff(b)
                    for b in bodies)
    client.send(wire + b"QUIT\r\n")
    ids = []
    for _ in bodies:
        assert [r.code for r in client.replies(3)] == [250, 250, 354]
        ids.append(client.reply().queue_id)
    assert client.reply().raw == replies.CLOSING.wire
    assert len(set(ids)) == 2
    stored = sorted(data for _, data in server.maildir_messages())
    assert len(stored) == 2
    assert sum(data.endswith(server.stored_form(bodies[0])) for data in stored) == 1
    assert sum(data.endswith(server.stored_form(bodies[1])) for data in stored) == 1


def _body(conn: int, n: int) -> bytes:
    return (f"Subject: c{conn} m{n}\r\nX-Tag: {conn}-{n}\r\n\r\n".encode()
            + b".dotted line\r\n" + f"payload {conn}-{n} ".encode() * 20 + b"\r\n")


def _queue_id_of(name: str) -> str:
    """Maildir names are "<queue id>.<host>", and a queue id holds exactly one dot."""
    return ".".join(name.split(".")[:2])


def _client_run(port: int, conn: int, count: int, errors: list, ids: list) -> None:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            assert smtp.ehlo(f"client{conn}.test")[0] == 250
            for n in range(count):
                assert smtp.mail(f"c{conn}@example.org") == (250, b"2.1.0 Ok")
                assert smtp.rcpt(f"r{conn}-{n}@example.org") == (250, b"2.1.5 Ok")
                code, text = smtp.data(_body(conn, n))
                if code != 250:
                    errors.append((conn, n, code, text))
                    continue
                ids.append((conn, n, text.decode().removeprefix("2.0.0 Ok: queued as ")))
    except Exception as exc:  # reported by the test, never lost in a thread
        errors.append((conn, repr(exc)))


def _run_clients(port: int, connections: int, per_connection: int, offset: int,
                 deadline_s: float) -> list:
    errors: list = []
    ids: list = []
    threads = [threading.Thread(target=_client_run,
                                args=(port, offset + c, per_connection, errors, ids),
                                daemon=True)
               for c in range(connections)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + deadline_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not [t for t in threads if t.is_alive()], "clients still running at the deadline"
    assert errors == []
    assert len(ids) == connections * per_connection
    return ids


def test_many_concurrent_clients(make_server):
    """200 connections x 3 messages, then 400 more over 50 connections: 600, then 1,000."""
    server = make_server()
    started = time.monotonic()
    ids = _run_clients(server.port, 200, 3, 0, deadline_s=60)
    assert len({queue_id for _, _, queue_id in ids}) == 600
    new = server.files("new")
    assert len(new) == 600
    assert server.files("tmp") == []
    by_id = {_queue_id_of(p.name): p for p in new}
    for conn, n, queue_id in ids:
        data = by_id[queue_id].read_bytes()
        assert data.endswith(server.stored_form(_body(conn, n))), (conn, n)
        assert f"Delivered-To: r{conn}-{n}@example.org\n".encode() in data

    more = _run_clients(server.port, 50, 8, 1000, deadline_s=60)
    everything = ids + more
    assert len({queue_id for _, _, queue_id in everything}) == 1000
    assert len(server.files("new")) == 1000
    assert server.files("tmp") == []
    found = server.maildir_messages()
    assert len(found) == 1000
    tags = {re.search(rb"\nX-Tag: (\S+)\n", data).group(1) for _, data in found}
    assert tags == {f"{c}-{n}".encode() for c, n, _ in everything}
    elapsed = time.monotonic() - started
    print(f"1,000 messages over 250 connections in {elapsed:.1f}s")
    assert elapsed < 90


def test_max_connections_per_worker(make_server, raw_clients):
    server = make_server({"server": {"workers": 1, "max_connections": 5}})
    held = [raw_clients(server.port) for _ in range(5)]
    for client in held:
        client.expect(220)
    sixth = raw_clients(server.port)
    assert sixth.reply().raw == replies.TOO_MANY_CONNECTIONS.wire
    assert sixth.wait_closed() == b""
    # The five still work, and a slot freed by QUIT is usable again.
    held[0].cmd("QUIT", 221, "2.0.0")
    held[0].wait_closed()
    held[1].cmd("NOOP", 250, "2.0.0")

    def accepted() -> bool:
        with raw_clients(server.port) as again:
            return again.reply().code == 220
    server.wait_until(accepted, 5, interval=0.1, message="a free connection slot")


def test_discard_backend_stores_nothing(make_server, raw_clients, tmp_path):
    server = make_server({"delivery": {"backend": "discard"}})
    client = raw_clients(server.port)
    client.hello()
    ids = {client.send_message(b"Subject: x\r\n\r\nbody %d\r\n" % i).queue_id for i in range(5)}
    assert len(ids) == 5
    assert all(queue_id.startswith("D") for queue_id in ids)
    client.cmd("QUIT", 221)
    leftovers = [p for p in tmp_path.rglob("*") if p != server.config_path]
    assert leftovers == []


def _batch_allowed() -> bool:
    """Whether this system lets a process choose SCHED_BATCH (a sandbox may not)."""
    if not hasattr(os, "SCHED_BATCH"):
        return False
    probe = "import os; os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


@pytest.mark.skipif(not _batch_allowed(), reason="SCHED_BATCH cannot be chosen here")
@pytest.mark.parametrize("batch, delivery, expected", [
    (True, {"fsync": True}, "SCHED_BATCH"),
    (False, {"backend": "discard"}, "SCHED_OTHER"),
    ("auto", {"backend": "discard"}, "SCHED_BATCH"),
    ("auto", {"fsync": False}, "SCHED_BATCH"),
    ("auto", {"fsync": True}, "SCHED_OTHER"),  # replies wait for the disk: wake promptly
])
def test_workers_run_under_the_configured_scheduling_policy(make_server, batch, delivery,
                                                            expected):
    server = make_server({"server": {"workers": 1, "sched_batch": batch},
                          "delivery": delivery})
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as client:
        assert client.recv(100).startswith(b"220 ")  # the worker is in its loop: policy set
    [worker] = server.worker_pids()
    assert os.sched_getscheduler(worker) == getattr(os, expected)
    assert os.sched_getscheduler(server.pid) == os.SCHED_OTHER  # the master is not a worker
