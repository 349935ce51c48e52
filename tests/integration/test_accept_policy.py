"""Which workers take new connections (accepting.py), seen from outside: whose sockets."""

from __future__ import annotations

import os
import signal
import time


def client_sockets(pid: int) -> int:
    """Sockets a worker holds: its listeners and wake-up pipes, plus one per client."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass  # closed meanwhile
    return count


def greeted_clients(raw_clients, port: int, n: int) -> list:
    clients = []
    for _ in range(n):
        client = raw_clients(port)
        assert client.reply().code == 220
        clients.append(client)
    return clients


def listener_inode(port: int) -> str:
    """The inode of the listening socket on 127.0.0.1:`port`, from /proc/net/tcp."""
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
                return fields[9]
    raise AssertionError(f"nothing listens on port {port}")


def polls_listener(pid: int, inode: str) -> bool:
    """Whether one of the worker's epoll instances watches the listening socket."""
    fds, watched = set(), set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target == f"socket:[{inode}]":
                fds.add(int(fd))
            elif target == "anon_inode:[eventpoll]":
                with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                    watched.update(int(line.split()[1]) for line in info
                                   if line.startswith("tfd:"))
        except OSError:
            pass  # closed meanwhile
    return bool(fds & watched)


def test_fill_gives_a_light_load_to_one_worker(make_server, raw_clients):
    server = make_server({"server": {"workers": 2}})
    pids = server.worker_pids()
    inode = listener_inode(server.port)
    assert sorted(polls_listener(pid, inode) for pid in pids) == [False, True]
    before = {pid: client_sockets(pid) for pid in pids}
    clients = greeted_clients(raw_clients, server.port, 6)
    gained = {pid: client_sockets(pid) - before[pid] for pid in pids}
    assert sorted(gained.values()) == [0, 6]
    assert all(polls_listener(pid, inode) == (gained[pid] == 6) for pid in pids)
    for client in clients:
        client.cmd("QUIT", 221)


def test_spread_lets_every_worker_wait_on_the_socket(make_server, raw_clients):
    server = make_server({"server": {"workers": 2, "accept_policy": "spread"}})
    pids = server.worker_pids()
    inode = listener_inode(server.port)
    server.wait_until(lambda: all(polls_listener(pid, inode) for pid in pids), 5,
                      message="both workers polling the listener")
    before = {pid: client_sockets(pid) for pid in pids}
    greeted_clients(raw_clients, server.port, 6)
    # Whoever wakes first takes each one: the split is up to the scheduler.
    assert sum(client_sockets(pid) - before[pid] for pid in pids) == 6


def test_the_next_worker_takes_over_from_a_stuck_one(make_server, raw_clients):
    server = make_server({"server": {"workers": 2}})
    pids = server.worker_pids()
    inode = listener_inode(server.port)
    [first] = [pid for pid in pids if polls_listener(pid, inode)]
    [second] = [pid for pid in pids if pid != first]
    before = client_sockets(second)
    os.kill(first, signal.SIGSTOP)  # alive, but it stops beating and accepting
    try:
        started = time.monotonic()
        client = raw_clients(server.port)
        assert client.reply().code == 220  # from the second, once the first is stale
        waited = time.monotonic() - started
        assert client_sockets(second) == before + 1
        assert polls_listener(second, inode)
        assert 2.0 < waited < 6.0, waited  # LIVE_S (3 s) without a beat, then at once
        client.cmd("QUIT", 221)
    finally:
        os.kill(first, signal.SIGCONT)
    # Back, it beats again and takes new connections back from the second.
    server.wait_until(lambda: not polls_listener(second, inode), 5,
                      message="the second worker to step back")
    assert polls_listener(first, inode)
