"""limits.per_client on a real server: counted across workers, after a worker's death, and
by the address a PROXY header names.

A worker shares its per-minute counts within clientlimits.FLUSH_S (10 ms): a test waits
SHARED_S before it expects another worker to see them. The rate limits count in minutes
of CLOCK_MONOTONIC, the clock the server reads too: a
test of a rate starts clear of a minute's end (`clear_of_minute_end`), so the previous
minute's weight cannot change under it.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from support import proxyheader

pytest.importorskip("trustme")  # support.tlsserver needs it

from support.tlsserver import (  # noqa: E402
    HOST, client_hello, free_ports, metrics, start_tls, tls_overrides, wait_for_metric,
)

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"),
                                reason="finds sessions' workers in /proc")

SESSIONS_REFUSED = 'minismtp_per_client_refused_total{reason="sessions"}'
NEW_REFUSED = 'minismtp_per_client_refused_total{reason="new_sessions"}'
RCPT_REFUSED = 'minismtp_per_client_refused_total{reason="recipients"}'
SHARED_S = 0.2  # a worker's per-minute counts reach the other workers within FLUSH_S


def overrides(workers: int = 2, **per_client) -> dict:
    return {"server": {"workers": workers},
            "limits": {"per_client": per_client},
            "stats": {"listen": f"{HOST}:{free_ports(1)[0]}"},
            "delivery": {"backend": "discard"}}


def clear_of_minute_end(needed_s: float = 20.0) -> None:
    """Wait, if need be, until a monotonic minute has `needed_s` seconds left."""
    into = time.monotonic() % 60
    if into > 60 - needed_s:
        time.sleep(60 - into + 0.1)


def holder(client, workers: list[int]) -> int | None:
    """Which worker holds the server side of `client`'s connection (by /proc)."""
    port = client.sock.getsockname()[1]
    inodes = set()
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == port:  # its remote end is our client
                inodes.add(fields[9])
    for pid in workers:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] in inodes:
                    return pid
            except OSError:
                continue
    return None


def _stopped(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, f"worker {pid} did not stop"
        time.sleep(0.005)


def first_reply_from(server, raw_clients, pid: int, workers: list[int]):
    """A new client and the first reply it gets, from worker `pid`: the other workers
    are stopped meanwhile, so the connection can only be its."""
    others = [other for other in workers if other != pid]
    for other in others:
        _stopped(other)
    try:
        client = raw_clients(server.port)
        return client, client.reply(timeout=5.0)
    finally:
        for other in others:
            os.kill(other, signal.SIGCONT)


def test_sessions_are_limited_across_workers(make_server, raw_clients):
    server = make_server(overrides(max_sessions=3))
    first, second = server.wait_for_workers(2)
    time.sleep(0.3)  # both in their loops
    workers = [first, second]
    held = []
    for pid in (first, first, second):
        client, reply = first_reply_from(server, raw_clients, pid, workers)
        assert reply.code == 220
        held.append(client)
    assert [holder(c, workers) for c in held] == [first, first, second]
    for pid in workers:  # whichever worker takes the 4th, the answer is the same
        mark = server.mark()
        _, reply = first_reply_from(server, raw_clients, pid, workers)
        assert reply.code == 421 and reply.text == (
            "4.7.0 mx.test.invalid Error: too many connections from 127.0.0.1"), reply
        server.wait_for_log(r"disconnect from 127\.0\.0\.1:\d+ listener=\S+ commands=0 "
                            r"end=refused: too many sessions from this client", since=mark)
    wait_for_metric(server, SESSIONS_REFUSED, 2)
    held[0].cmd("QUIT", 221)
    held[0].wait_closed()
    time.sleep(0.2)
    fresh = raw_clients(server.port)
    fresh.expect(220)
    fresh.cmd("EHLO client.test", 250)
    assert metrics(server)['minismtp_rejections_total{code="421"}'] == 2


def test_new_sessions_per_minute(make_server, raw_clients):
    clear_of_minute_end()
    server = make_server(overrides(max_new_sessions_per_minute=3))
    for _ in range(3):
        client = raw_clients(server.port)
        client.expect(220)
        client.cmd("QUIT", 221)
    time.sleep(SHARED_S)  # whichever worker counted the third has shared it by now
    refused = raw_clients(server.port)
    refused.expect(421, "4.7.0")
    assert refused.wait_closed() == b""
    server.wait_for_log(r"end=refused: too many new sessions from this client in a minute")
    wait_for_metric(server, NEW_REFUSED, 1)


def test_recipients_per_minute(make_server, raw_clients):
    clear_of_minute_end()
    server = make_server(overrides(max_recipients_per_minute=3))
    one = raw_clients(server.port)
    one.expect(220)
    one.cmd("EHLO client.test", 250)
    one.cmd("MAIL FROM:<a@example.org>", 250)
    for n in range(3):
        one.cmd(f"RCPT TO:<r{n}@example.org>", 250)
    reply = one.cmd("RCPT TO:<r3@example.org>", 450, "4.7.1")
    assert reply.text == "4.7.1 Error: too many recipients from 127.0.0.1"
    one.cmd("DATA", 354)
    one.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    one.expect(250)  # the three accepted ones still get their message
    time.sleep(SHARED_S)
    two = raw_clients(server.port)  # another session, maybe another worker: same count
    two.expect(220)
    two.cmd("HELO client.test", 250)
    two.cmd("MAIL FROM:<a@example.org>", 250)
    two.cmd("RCPT TO:<r4@example.org>", 450, "4.7.1")
    wait_for_metric(server, RCPT_REFUSED, 2)


def test_rcpts_over_the_rate_end_the_session_after_the_overshoot(make_server, raw_clients):
    # Counted as RCPTs past max_recipients are: the first 1000 (the core's
    # max_recipient_overshoot) free, then each an error, then 421: a client over its rate
    # cannot hold its session open by sending RCPTs forever.
    clear_of_minute_end()
    config = overrides(workers=1, max_recipients_per_minute=1)
    config["limits"]["max_errors"] = 3
    server = make_server(config)
    client = raw_clients(server.port)
    client.expect(220)
    client.cmd("EHLO client.test", 250)
    client.cmd("MAIL FROM:<a@example.org>", 250)
    client.cmd("RCPT TO:<r@example.org>", 250)
    client.send(b"RCPT TO:<r@example.org>\r\n" * 1010)
    codes = [reply.code for reply in client.replies(1004)]
    assert codes == [450] * 1003 + [421]
    assert client.wait_closed() == b""


def test_a_killed_workers_sessions_are_released_and_its_minute_kept(make_server,
                                                                    raw_clients):
    clear_of_minute_end(40)
    server = make_server(overrides(workers=1, max_sessions=2, max_new_sessions_per_minute=6))
    (worker,) = server.wait_for_workers(1)
    held = [raw_clients(server.port) for _ in range(2)]
    for client in held:
        client.expect(220)
    raw_clients(server.port).expect(421, "4.7.0")  # attempts so far: 3
    time.sleep(SHARED_S)  # what the worker counted is in the shared table now
    os.kill(worker, signal.SIGKILL)
    for client in held:
        client.wait_closed()
    server.wait_until(lambda: len(pids := server.worker_pids()) == 1 and worker not in pids,
                      10)
    server.wait_for_log(r"was killed by signal 9")
    time.sleep(0.3)
    for _ in range(3):  # its 2 sessions are gone; attempts 4, 5, 6
        client = raw_clients(server.port)
        client.expect(220)
        client.cmd("QUIT", 221)
        client.wait_closed()
    # The 7th in this minute: refused, so the first three were not forgotten.
    refused = raw_clients(server.port).expect(421, "4.7.0")
    assert "per minute" in refused.text


def test_a_proxy_listener_limits_the_address_in_the_header(make_server, raw_clients):
    config = overrides(max_sessions=1)
    config["server"]["listen"] = [{"address": f"{HOST}:0", "proxy_protocol": {
        "version": "v2", "trusted": ["127.0.0.1/32"]}}]
    server = make_server(config)
    def proxied(source: str):
        client = raw_clients(server.port)
        dst = "::1" if ":" in source else "127.0.0.1"
        client.send(proxyheader.v2((source, 40000), (dst, 25)))
        return client

    first = proxied("192.0.2.10")
    first.expect(220)
    second = proxied("192.0.2.11")  # the same real peer, another client
    second.expect(220)
    again = proxied("192.0.2.10").expect(421, "4.7.0")
    assert again.text.endswith("too many connections from 192.0.2.10")
    v6 = proxied("2001:db8::1")
    v6.expect(220)
    proxied("2001:db8::1").expect(421, "4.7.0")
    wait_for_metric(server, SESSIONS_REFUSED, 2)


def test_a_reload_applies_new_limits_and_keeps_the_table_size(make_server, raw_clients):
    server = make_server(overrides(workers=1, max_sessions=1))
    (old,) = server.wait_for_workers(1)
    held = raw_clients(server.port)
    held.expect(220)
    raw_clients(server.port).expect(421, "4.7.0")
    mark = server.mark()
    server.write_config({"limits": {"per_client": {"max_sessions": 2, "table_size": 2048}}})
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(r"reload: limits\.per_client\.table_size stays 16384 until a "
                        r"restart", since=mark)
    held.expect(421, "4.3.2")  # the retiring worker sends its idle session off
    held.wait_closed()
    server.wait_until(lambda: len(pids := server.worker_pids()) == 1 and old not in pids,
                      10)
    time.sleep(0.3)
    clients = [raw_clients(server.port) for _ in range(3)]
    assert [c.reply(timeout=5.0).code for c in clients] == [220, 220, 421]


def test_an_implicit_tls_listener_counts_from_the_handshake(make_server, raw_clients, pki,
                                                            tls_files):
    """A session is counted before its handshake: handshakes left half done hold their
    client's places, not every place of the worker. One over the limit is closed at
    once, without a handshake (and so without a 421), as for too many connections."""
    server = make_server(tls_overrides(*tls_files, [{"address": f"{HOST}:0",
                                                     "tls": "implicit"}],
                                       limits={"per_client": {"max_sessions": 2},
                                               "tls_handshake_timeout": "30s"}))
    context = pki.client_context()
    hello = client_hello(context)
    stalled = [raw_clients(server.port) for _ in range(2)]
    for client in stalled:
        client.send(hello[:len(hello) // 2])  # half a ClientHello, then silence
    time.sleep(0.3)
    refused = raw_clients(server.port)
    refused.send(hello)
    assert refused.wait_closed() == b""  # no ServerHello: closed before any handshake
    line = server.wait_for_log(r"disconnect from 127\.0\.0\.1:\d+ .*").group(0)
    assert line.endswith("commands=0 end=refused: too many sessions from this client"), line
    for client in stalled:
        client.sock.close()
    time.sleep(0.3)
    third = raw_clients(server.port)
    start_tls(third, context)  # the stalled ones' places are free again
    third.expect(220)
    third.cmd("QUIT", 221)
