"""A new generation whose workers crash at start (support/crashhook.py): the one before
serves on, its dead are replaced, and nothing listens that nobody accepts from."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from support.crashhook import CrashHook
from support.neighbours import free_port

HOST = "127.0.0.1"


def _hostname(port: int, timeout: float = 3.0) -> str:
    """The name in the greeting of a new connection (raises if none comes in time)."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        data = b""
        while b"\r\n" not in data:
            piece = sock.recv(512)
            if not piece:
                break
            data += piece
    assert data.startswith(b"220 "), data
    return data[4:].split(b" ", 1)[0].decode()


def _every_connection_answered(port: int, count: int = 30) -> None:
    """`count` new connections, each greeted at once: whichever of the port's sockets
    the kernel picks, a worker accepts from it."""
    for _ in range(count):
        assert _hostname(port, timeout=2.0) == "mx.test.invalid"


@pytest.fixture
def hook(tmp_path):
    hook = CrashHook(tmp_path)
    yield hook
    hook.off()


def test_while_a_reload_crash_loops_the_serving_generation_is_kept_whole(make_server, hook):
    """Both workers of the serving generation die (OOM killer, SIGKILL) while the new one
    crashes at every start: each is replaced by a worker of its own generation, so mail
    is still taken; once the cause is gone the new generation takes over."""
    server = make_server({"server": {"workers": 2, "hostname": "before.test"}}, env=hook.env)
    old = server.worker_pids()
    assert _hostname(server.port) == "before.test"
    hook.on("after.test")
    server.write_config({"server": {"hostname": "after.test"}})
    mark = server.mark()
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(r"reloaded .*: starting generation 1 ", since=mark)
    server.wait_for_log(r"crash at start \(test hook\)", since=mark)
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    for pid in old:
        server.wait_for_log(rf"worker {pid} was killed by signal 9; replacing it", 5,
                            since=mark)
    deadline = time.monotonic() + 3.0  # the replacements start at once, not after the
    while time.monotonic() < deadline:  # crash loop's growing back-off
        assert _hostname(server.port) == "before.test"
        time.sleep(0.2)
    hook.off()
    server.wait_until(lambda: _hostname(server.port) == "after.test", 40,
                      interval=0.5, message="the new generation to take over")
    assert server.stop() == 0



def _listening_sockets(port: int) -> int:
    """How many IPv4 sockets listen on `port` (/proc/net/tcp, state 0A)."""
    with open("/proc/net/tcp") as table:
        next(table)
        return sum(1 for row in table if row.split()[3] == "0A"
                   and int(row.split()[1].split(":")[1], 16) == port)


def _once_the_crash_is_gone(server, hook, workers: int) -> None:
    """The crash stops: the next generation's worker takes the third socket and makes it
    listen, `workers` serve, every connection is answered, and the server stops cleanly."""
    hook.off()
    server.wait_until(lambda: _listening_sockets(server.port) == 3, 40, interval=0.2,
                      message="a worker of the new generation to take the third socket")
    server.wait_for_workers(workers, 10)
    _every_connection_answered(server.port)
    assert server.stop() == 0


def test_with_reuse_port_a_new_socket_takes_no_connection_until_its_worker_is_up(
        make_server, hook):
    """TTIN with reuse_port: a new generation of three, whose workers crash at start. The
    third socket it needs must not listen (the kernel would send it a third of the new
    connections, for nobody to accept) until a worker that takes it is set up."""
    server = make_server({"server": {"workers": 2, "reuse_port": True}}, env=hook.env)
    server.wait_until(lambda: _listening_sockets(server.port) == 2, 10, interval=0.05,
                      message="each worker's socket to listen, once it is set up")
    hook.on()
    mark = server.mark()
    server.send_signal(signal.SIGTTIN)
    server.wait_for_log(r"workers: 3, as generation 1$", since=mark)
    server.wait_for_log(r"crash at start \(test hook\)", since=mark)
    _every_connection_answered(server.port)
    assert _listening_sockets(server.port) == 2
    _once_the_crash_is_gone(server, hook, workers=3)


def test_with_reuse_port_a_socket_only_a_dropped_generation_listened_on_is_closed(
        make_server, hook):
    """TTIN with reuse_port: in the new generation of three, the first worker crashes at
    every start and the third one is set up, so the socket grown for it listens. TTOU
    before that generation is ready drops it, and the one after it crashes the same way.
    The serving generation takes two sockets: the third must not go on listening with
    nobody to accept from it (the kernel would send it a third of the new connections,
    to wait unanswered until a generation is ready), and once the crash is gone the next
    generation's worker makes it listen again."""
    server = make_server({"server": {"workers": 2, "reuse_port": True}}, env=hook.env)
    server.wait_until(lambda: _listening_sockets(server.port) == 2, 10, interval=0.05,
                      message="each worker's socket to listen, once it is set up")
    hook.on(index=0)
    mark = server.mark()
    server.send_signal(signal.SIGTTIN)
    server.wait_for_log(r"workers: 3, as generation 1$", since=mark)
    server.wait_for_log(r"crash at start \(test hook\)", since=mark)
    server.wait_until(lambda: _listening_sockets(server.port) == 3, 10, interval=0.02,
                      message="the third worker to be set up and make its socket listen")
    mark = server.mark()
    server.send_signal(signal.SIGTTOU)
    server.wait_for_log(r"workers: 2, as generation 2$", since=mark)
    server.wait_until(lambda: _listening_sockets(server.port) == 2, 5, interval=0.05,
                      message="the dropped generation's third socket to stop listening")
    server.wait_for_log(r"closed a socket listening with no worker to accept from it",
                        since=mark)
    _every_connection_answered(server.port)
    _once_the_crash_is_gone(server, hook, workers=2)


def test_with_reuse_port_a_generation_left_for_the_next_loses_no_queue_to_it(
        make_server, hook):
    """A healthy server, two TTINs in a row: the first generation's worker 0 is slow to
    set up, so that generation is not ready when the second TTIN leaves it, and its
    worker 2 has made the socket grown for it listen. The next generation's worker 2
    takes that socket: it is not closed (nor what waits on it reset), and every
    connection is answered throughout."""
    server = make_server({"server": {"workers": 2, "reuse_port": True}}, env=hook.env)
    server.wait_until(lambda: _listening_sockets(server.port) == 2, 10, interval=0.05,
                      message="each worker's socket to listen, once it is set up")
    hook.on(index=0, slow_s=3.0)
    mark = server.mark()
    server.send_signal(signal.SIGTTIN)
    server.wait_for_log(r"workers: 3, as generation 1$", since=mark)
    server.wait_until(lambda: _listening_sockets(server.port) == 3, 10, interval=0.02,
                      message="the third worker to be set up and make its socket listen")
    hook.off()
    server.send_signal(signal.SIGTTIN)
    server.wait_for_log(r"workers: 4, as generation 2$", since=mark)
    server.wait_for_workers(4, 15)
    _every_connection_answered(server.port, 40)
    assert "closed a socket listening" not in server.log_text()
    assert server.stop() == 0


def test_an_address_a_crash_looping_reload_adds_refuses_connections(make_server, hook):
    """A reload adds an address and its new generation crashes at every start: the old
    generation serves on its own addresses, and the new one, which no started worker
    accepts from, refuses connections (a sending MTA moves on at once) instead of
    completing handshakes nobody answers."""
    server = make_server({"server": {"workers": 2, "hostname": "before.test"}}, env=hook.env)
    added = free_port()
    hook.on("after.test")
    server.write_config({"server": {"hostname": "after.test",
                                    "listen": [f"{HOST}:0", f"{HOST}:{added}"]}})
    mark = server.mark()
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(r"crash at start \(test hook\)", since=mark)
    assert _hostname(server.port) == "before.test"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, added), timeout=3).close()
    hook.off()

    def greeted_there() -> bool:
        try:
            return _hostname(added) == "after.test"
        except OSError:  # refused until a worker of the new generation is set up
            return False

    server.wait_until(greeted_there, 40, interval=0.5,
                      message="the new generation to take the added address")
    assert server.stop() == 0
