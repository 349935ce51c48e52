"""The log a session leaves: one summary line when it closes, whatever ended it, and the
same lines as JSON objects with `logging.format: json`."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

from minismtp.smtp import replies


def test_a_session_ends_with_its_summary(make_server, raw_clients):
    server = make_server({"server": {"workers": 1}})
    client = raw_clients(server.port)
    client.hello()
    client.send_message(b"Subject: hi\r\n\r\nhello\r\n")
    client.send(b"QUIT\r\n")
    client.expect(221)
    port = client.sock.getsockname()[1]
    line = server.wait_for_log(rf"INFO disconnect from 127\.0\.0\.1:{port} .*")
    assert line.group(0).endswith(
        f"disconnect from 127.0.0.1:{port} listener=127.0.0.1:0 ehlo=1 mail=1 rcpt=1 data=1 "
        "quit=1 commands=5 end=quit")


def test_a_worker_killed_keeps_the_lines_of_every_turn_before_its_last(make_server,
                                                                        raw_clients):
    """A turn's lines go to shared memory before the loop polls again, and are written
    out in batches: once the reply to a later command (NOOP) has come back, SIGKILL
    cannot take a message's line. The master writes what the worker held, before its own
    line about the death, and no line twice."""
    server = make_server({"server": {"workers": 1}})
    (worker,) = server.wait_for_workers(1)
    client = raw_clients(server.port)
    client.hello()
    ids = [client.send_message(b"Subject: hi\r\n\r\nhello\r\n").queue_id
           for _ in range(40)]
    client.cmd("NOOP", 250)
    os.kill(worker, signal.SIGKILL)
    death = server.wait_for_log(rf"worker {worker} was killed by signal 9", timeout=5)
    text = server.log_text()
    for queue_id in ids:
        line = f"INFO id={queue_id} peer=127.0.0.1 "
        assert text.count(line) == 1
        assert text.index(line) < text.index(death.group(0))


def test_a_worker_killed_under_load_leaves_a_line_for_every_250(make_server, raw_clients):
    """Several clients send as fast as they can while the worker is killed: each message
    answered 250 has its line, once, written by the worker or by the master after the
    death. A message's line is held before its 250 goes out, so whatever turn the kill
    falls in, no 250 the clients saw is missing from the log."""
    server = make_server({"server": {"workers": 1}})
    (worker,) = server.wait_for_workers(1)
    answered: list[str] = []
    lock = threading.Lock()

    def send_until_cut(client) -> None:
        try:
            client.hello()
            while True:
                reply = client.send_message(b"Subject: load\r\n\r\nhello\r\n")
                if reply.code != 250:
                    return
                with lock:
                    answered.append(reply.queue_id)
        except (ConnectionError, OSError, AssertionError):
            return  # the worker died under it

    threads = [threading.Thread(target=send_until_cut, args=(raw_clients(server.port),))
               for _ in range(6)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(answered) < 300 and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(worker, signal.SIGKILL)
    for thread in threads:
        thread.join(timeout=15)
    death = server.wait_for_log(rf"worker {worker} was killed by signal 9", timeout=5)
    text = server.log_text()
    before_death = text[:text.index(death.group(0))]
    assert len(answered) >= 300
    for queue_id in answered:
        assert before_death.count(f"INFO id={queue_id} peer=127.0.0.1 ") == 1, queue_id
    assert text.count(" INFO id=") == before_death.count(" INFO id=")  # none after it


def test_a_client_speaking_tls_on_a_plain_port_is_named(make_server, raw_clients):
    # What a client expecting implicit TLS sends first: a ClientHello record.
    server = make_server({"server": {"workers": 1}, "limits": {"max_errors": 2}})
    client = raw_clients(server.port)
    client.expect(220)
    port = client.sock.getsockname()[1]
    client.send(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n" + b"\x00" * 4 + b"\r\n")
    assert [client.reply().code for _ in range(2)] == [500, 500]  # one per line
    assert client.reply().raw == replies.TOO_MANY_ERRORS.wire
    line = server.wait_for_log(rf"disconnect from 127\.0\.0\.1:{port} .*")
    assert line.group(0).endswith(
        "unknown=2 commands=2 errors=2 end=too many errors (the client sent a TLS handshake)")


def test_an_idle_client_is_logged_as_timed_out(make_server, raw_clients):
    server = make_server({"server": {"workers": 1}, "limits": {"command_timeout": "1s"}})
    client = raw_clients(server.port)
    client.hello()
    port = client.sock.getsockname()[1]
    assert client.reply(timeout=5).raw == replies.TIMEOUT.wire
    server.wait_for_log(rf"disconnect from 127\.0\.0\.1:{port} listener=127\.0\.0\.1:0 "
                        r"ehlo=1 commands=1 "
                        r"end=timeout in state ready$")


def test_json_format_makes_every_line_an_object(make_server, raw_clients):
    server = make_server({"server": {"workers": 1}, "logging": {"format": "json"}})
    client = raw_clients(server.port)
    client.hello()
    queued = client.send_message(b"Subject: hi\r\n\r\nhello\r\n")
    client.send(b"QUIT\r\n")
    client.expect(221)
    server.wait_for_log(r'"event": "disconnect"')
    records = [json.loads(line) for line in server.log_text().splitlines() if line.strip()]
    assert {"listening", "message", "disconnect"} <= {
        record.get("event") or record["message"].split()[0] for record in records}
    [message] = [r for r in records if r.get("event") == "message"]
    assert (message["id"], message["from"], message["result"]) == (
        queued.queue_id, "sender@example.org", "250 queued")
    [summary] = [r for r in records if r.get("event") == "disconnect"]
    assert summary["commands"] == {"EHLO": 1, "MAIL": 1, "RCPT": 1, "DATA": 1, "QUIT": 1}
    assert summary["end"] == "quit" and summary["errors"] == 0
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+[+-]\d{4}", r["time"]) for r in records)
