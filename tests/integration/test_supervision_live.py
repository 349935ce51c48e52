"""The master's supervision on a real server: stuck workers, crash debris, descriptors."""

from __future__ import annotations

import os
import resource
import selectors
import signal
import socket
import time

from minismtp.smtp import replies

BODY_HEAD = b"Subject: cut short\r\n\r\n" + b"first half of the body\r\n" * 20


def _replaced(server, victim: int, count: int = 1) -> list[int]:
    def done() -> list[int] | None:
        pids = server.worker_pids()
        return pids if len(pids) == count and victim not in pids else None

    return server.wait_until(done, 15, message=f"worker {victim} to be replaced")


def test_a_stopped_worker_gets_sigabrt_then_sigkill_and_is_replaced(make_server, raw_clients):
    server = make_server({"server": {"workers": 1, "worker_timeout": "5s"}})
    [frozen] = server.worker_pids()
    mark = server.mark()
    os.kill(frozen, signal.SIGSTOP)  # no handler can run: SIGABRT stays pending
    server.wait_for_log(rf"worker {frozen} missed its heartbeat for \d+s: SIGABRT",
                        15, since=mark)
    server.wait_for_log(rf"worker {frozen} still alive \d+s after SIGABRT: killing it",
                        10, since=mark)
    server.wait_for_log(rf"worker {frozen} was killed by signal {int(signal.SIGKILL)}; "
                        "replacing it", 10, since=mark)
    _replaced(server, frozen)
    client = raw_clients(server.port)
    client.hello()
    assert client.send_message(b"Subject: after\r\n\r\nserved\r\n").code == 250


def test_sigabrt_makes_a_worker_log_where_it_was(make_server, raw_clients):
    server = make_server({"server": {"workers": 1}})
    [worker] = server.worker_pids()
    raw_clients(server.port).expect(220)  # its loop runs: its start-up is over
    mark = server.mark()
    os.kill(worker, signal.SIGABRT)
    server.wait_for_log(r"^Fatal Python error: Aborted", since=mark)
    server.wait_for_log(r'^  File ".*/minismtp/worker\.py", line \d+ in run$', since=mark)
    server.wait_for_log(rf"worker {worker} was killed by signal {int(signal.SIGABRT)}; "
                        "replacing it", since=mark)
    _replaced(server, worker)


def test_a_worker_killed_mid_data_leaves_no_file_in_tmp(make_server, raw_clients):
    server = make_server({"server": {"workers": 1}})
    [worker] = server.worker_pids()
    done = raw_clients(server.port)
    done.hello()
    stored = done.send_message(b"Subject: kept\r\n\r\nacknowledged\r\n")
    [(key, before)] = server.maildir_messages()
    assert key.startswith(stored.queue_id + ".")
    tmp = server.mail_dir / "tmp"
    strangers = [tmp / f"1700000000.M1P{worker + 1}Q1.host", tmp / "notes.txt",
                 tmp / f"1700000000.M1P{worker}Q9.host.d"]
    strangers[2].mkdir()  # a directory with the dead pid's name is not ours to remove
    for path in strangers[:2]:
        path.write_bytes(b"someone else's\r\n")
    busy = raw_clients(server.port)
    busy.hello()
    busy.send(busy.envelope("cut@example.org", ["r@example.org"]))
    assert [r.code for r in busy.replies(3)] == [250, 250, 354]
    busy.send(BODY_HEAD)
    partial = server.wait_until(
        lambda: [p for p in server.files("tmp") if f"P{worker}Q" in p.name and p.stat().st_size],
        5, message="the partial message in tmp/")
    mark = server.mark()
    os.kill(worker, signal.SIGKILL)
    _replaced(server, worker)
    server.wait_until(lambda: not partial[0].exists(), 5, message="the partial file removed")
    server.wait_for_log(rf"removed 1 unfinished message file\(s\) of worker {worker} from "
                        rf"{tmp}$", since=mark)
    assert all(path.exists() for path in strangers)
    assert server.maildir_messages() == [(key, before)]


def _fd_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return apply


def test_a_queue_beyond_the_cap_gets_421_at_once_without_running_out_of_descriptors(
        make_server):
    # A wake-up takes the room under the cap and a few more to refuse, not a whole batch:
    # 300 queued beyond the cap all get their 421 promptly, with no accept failing for
    # want of a descriptor (which paused accepting for half a second each time).
    server = make_server({"server": {"workers": 1}}, preexec_fn=_fd_limit(64))
    found = server.wait_for_log(r"open file limit 64: at most (\d+) connections per worker")
    cap = int(found.group(1))
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(cap)]
    extra: list[socket.socket] = []
    try:
        for s in held:
            assert s.recv(512).startswith(b"220 ")
        selector = selectors.DefaultSelector()
        started = time.monotonic()
        for n in range(300):
            s = socket.create_connection(("127.0.0.1", server.port))
            s.setblocking(False)
            selector.register(s, selectors.EVENT_READ, n)
            extra.append(s)
        answered: dict[int, float] = {}
        while len(answered) < 300 and time.monotonic() - started < 10:
            for key, _ in selector.select(0.5):
                answered[key.data] = time.monotonic() - started
                selector.unregister(key.fileobj)
        refused = sum(s.recv(512) == replies.TOO_MANY_CONNECTIONS.wire for s in extra)
        selector.close()
    finally:
        for s in held + extra:
            s.close()
    latest = max(answered.values(), default=float("inf"))
    print(f"{len(answered)} of 300 answered, the last after {latest:.2f}s")
    assert refused == 300 and latest < 2.0
    assert not any("Too many open files" in line for line in server.lines)


def test_connections_beyond_the_descriptor_limit_get_421_and_data_still_works(
        make_server, raw_clients):
    server = make_server({"server": {"workers": 1}}, preexec_fn=_fd_limit(64))
    found = server.wait_for_log(r"open file limit 64: at most (\d+) connections per worker "
                                r"\(server\.max_connections: 4096\); more get 421")
    cap = int(found.group(1))
    assert 1 <= cap < 64
    busy = raw_clients(server.port)
    busy.hello()
    busy.send(busy.envelope("busy@example.org", ["r@example.org"])[:-len(b"DATA\r\n")])
    assert [r.code for r in busy.replies(2)] == [250, 250]
    greeted, turned_away = [], []
    for _ in range(cap + 10):  # ten more than fit
        client = raw_clients(server.port)
        reply = client.reply(timeout=5)
        (greeted if reply.code == 220 else turned_away).append(reply)
    assert len(greeted) == cap - 1  # the busy client holds one place
    assert [r.raw for r in turned_away] == [replies.TOO_MANY_CONNECTIONS.wire] * 11
    busy.send(b"DATA\r\n")
    busy.expect(354)
    busy.send(busy.stuff(b"Subject: squeezed\r\n\r\nstill stored\r\n"))
    queued = busy.reply()
    assert queued.code == 250, queued
    [(key, stored)] = server.maildir_messages()
    assert key.startswith(queued.queue_id + ".") and stored.endswith(b"still stored\n")
