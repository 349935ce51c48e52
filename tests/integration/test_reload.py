"""HUP on a real server: every changed key applies, or is refused with a log line while
the old value keeps serving; no connection is refused while the workers change."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

HOST = "127.0.0.1"


def _greeting(port: int, timeout: float = 5.0) -> bytes:
    """The first line the server sends on a new connection."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        data = b""
        while b"\r\n" not in data and len(data) < 512:
            piece = sock.recv(512)
            if not piece:
                break
            data += piece
        return data


def _hostname(port: int) -> str:
    line = _greeting(port)
    assert line.startswith(b"220 ") and line.endswith(b" ESMTP minismtp\r\n"), line
    return line[4:].split(b" ", 1)[0].decode()


def _listening_inodes(port: int) -> set[int]:
    """Inodes of the IPv4 sockets listening on `port` (/proc/net/tcp, state 0A)."""
    found = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for row in table:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
                found.add(int(fields[9]))
    return found


def _all_listening(server, count: int) -> set[int]:
    """The inodes of the server's `count` listening sockets, once each worker is set up:
    with reuse_port a worker makes its own socket listen (listeners.py)."""
    return server.wait_until(lambda: (found := _listening_inodes(server.port))
                             and len(found) == count and found, 10,
                             message=f"{count} listening sockets")


def _sockets_of(pid: int, inodes: set[int]) -> set[int]:
    """Which of `inodes` process `pid` holds a descriptor for."""
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and int(target[8:-1]) in inodes:
            held.add(int(target[8:-1]))
    return held


def _new_generation(server, old: set[int], count: int) -> list[int]:
    def replaced() -> list[int] | None:
        pids = server.worker_pids()
        return pids if len(pids) == count and not set(pids) & old else None

    return server.wait_until(replaced, 15, message="the old generation to be replaced")


def _reload(server, overrides: dict, generation: int) -> int:
    server.write_config(overrides)
    mark = server.mark()
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(rf"reloaded .*: starting generation {generation} ", since=mark)
    return mark


_TROUBLE = r"could not start|crashed|replacing it|Invalid argument|in use|stopping"


def test_reload_turning_reuse_port_on_gives_each_worker_its_own_socket(make_server):
    server = make_server({"server": {"workers": 2, "hostname": "before.test"}})
    old = set(server.worker_pids())
    mark = _reload(server, {"server": {"reuse_port": True, "hostname": "after.test"}}, 1)
    new = _new_generation(server, old, 2)
    assert [_hostname(server.port) for _ in range(6)] == ["after.test"] * 6
    inodes = _listening_inodes(server.port)
    first, second = (_sockets_of(pid, inodes) for pid in new)
    assert len(first) == len(second) == 1 and first != second  # SO_REUSEPORT siblings
    assert server.proc.poll() is None
    assert server.count_log(_TROUBLE, since=mark) == 0


def test_reload_turning_reuse_port_off_shares_the_sockets(make_server):
    server = make_server({"server": {"workers": 2, "reuse_port": True,
                                     "hostname": "before.test"}})
    old = set(server.worker_pids())
    mark = _reload(server, {"server": {"reuse_port": False, "hostname": "after.test"}}, 1)
    new = _new_generation(server, old, 2)
    assert [_hostname(server.port) for _ in range(6)] == ["after.test"] * 6
    inodes = _listening_inodes(server.port)
    first, second = (_sockets_of(pid, inodes) for pid in new)
    assert first == second == inodes  # every worker accepts from every socket
    assert server.proc.poll() is None
    assert server.count_log(_TROUBLE, since=mark) == 0


def test_no_connection_refused_across_reloads_with_reuse_port(make_server):
    server = make_server({"server": {"workers": 2, "reuse_port": True}})
    stop = threading.Event()
    greeted: list[int] = []
    failures: list[str] = []

    def connect_in_a_loop() -> None:
        for _ in range(20000):  # bounded; `stop` normally ends it first
            if stop.is_set():
                return
            try:
                line = _greeting(server.port)
            except OSError as exc:
                failures.append(repr(exc))
                continue
            if line.startswith(b"220 "):
                greeted.append(1)
            else:
                failures.append(repr(line))

    threads = [threading.Thread(target=connect_in_a_loop, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    for generation in range(1, 6):
        old = set(server.worker_pids())
        _reload(server, {"server": {"hostname": f"gen{generation}.test"}}, generation)
        _new_generation(server, old, 2)
    stop.set()
    for thread in threads:
        thread.join(15)
    assert not [t for t in threads if t.is_alive()]
    assert failures == []
    assert len(greeted) > 100
    assert _hostname(server.port) == "gen5.test"


def test_reload_applies_the_log_level(make_server, raw_clients):
    server = make_server({"server": {"workers": 1}, "logging": {"level": "info"}})
    [old] = server.worker_pids()
    raw_clients(server.port).hello()
    mark = _reload(server, {"logging": {"level": "debug"}}, 1)
    [new] = _new_generation(server, {old}, 1)
    # The master logs at debug now: the retired worker's clean exit.
    server.wait_for_log(rf"worker {old} exited with status 0", since=mark)
    # And so does the new worker: a client that goes away is noted.
    client = raw_clients(server.port)
    client.hello()
    client.close()
    server.wait_for_log(rf"minismtp\[{new}\] DEBUG closed 127\.0\.0\.1: client closed",
                        since=mark)


def test_reload_keeps_the_old_log_level_when_refused(make_server, raw_clients):
    server = make_server({"server": {"workers": 1}, "logging": {"level": "info"}})
    server.write_config({"logging": {"level": "debug"}, "limits": {"max_errors": 0}})
    mark = server.mark()
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(r"reload refused: still running on the previous", since=mark)
    client = raw_clients(server.port)
    client.hello()
    client.close()
    time.sleep(0.5)  # time for the worker to see the close (and, wrongly, log it)
    assert server.count_log(r" DEBUG ", since=mark) == 0


def test_reload_from_a_fifo_or_a_huge_file_is_refused_and_term_still_works(make_server):
    server = make_server({"server": {"workers": 1, "hostname": "kept.test"}})
    path = server.config_path
    path.unlink()
    os.mkfifo(path)
    mark = server.mark()
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(rf'reload refused: config: cannot read "{path}": not a regular file',
                        since=mark)
    assert _hostname(server.port) == "kept.test"

    path.unlink()
    path.write_bytes(b"server:\n  hostname: big.test\n" + b"#" * (1 << 20) + b"\n")
    mark = server.mark()
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(rf'reload refused: config: "{path}" is larger than 1048576 bytes',
                        since=mark)
    assert _hostname(server.port) == "kept.test"
    server.send_signal(signal.SIGTERM)
    assert server.wait(10) == 0


def _http_get(address: str, path: str) -> bytes:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        data = b""
        while len(data) < 1 << 20:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
        return data


def test_reload_moves_the_stats_endpoint_or_keeps_it(make_server):
    server = make_server({"server": {"workers": 1}})
    mark = _reload(server, {"stats": {"listen": "127.0.0.1:0"}}, 1)
    first = server.wait_for_log(r"statistics on http://(127\.0\.0\.1:\d+)/metrics",
                                since=mark).group(1)
    assert _http_get(first, "/metrics").startswith(b"HTTP/1.1 200 OK")
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        busy = f"{HOST}:{taken.getsockname()[1]}"
        mark = _reload(server, {"stats": {"listen": busy}}, 2)
        server.wait_for_log(rf"reload: stats\.listen stays 127\.0\.0\.1:0: cannot listen on "
                            rf"{busy} \(stats\.listen\)", since=mark)
        assert _http_get(first, "/metrics").startswith(b"HTTP/1.1 200 OK")
    mark = _reload(server, {"stats": {"listen": None}}, 3)
    try:
        _http_get(first, "/metrics")
    except ConnectionRefusedError:
        pass
    else:
        raise AssertionError("the old stats endpoint is still open")


def test_ttou_with_reuse_port_leaves_no_socket_without_a_worker(make_server):
    server = make_server({"server": {"workers": 2, "reuse_port": True}})
    old = set(server.worker_pids())
    inodes = _all_listening(server, 2)
    mark = server.mark()
    server.send_signal(signal.SIGTTOU)
    server.wait_for_log(r"workers: 1, as generation 1$", since=mark)
    [survivor] = _new_generation(server, old, 1)
    assert _sockets_of(survivor, inodes) == inodes  # the leaver's share too
    assert _listening_inodes(server.port) == inodes  # no socket was closed
    for _ in range(20):  # whichever socket the kernel picks, someone accepts
        assert _hostname(server.port) == "mx.test.invalid"


def test_with_reuse_port_a_replacement_after_ttin_takes_every_socket_of_the_dead(make_server):
    """Four sockets, then two workers (a reload), then TTIN: the worker holding the last
    socket dies, and its replacement must take all it held, or that socket's share of new
    connections would wait for nobody."""
    server = make_server({"server": {"workers": 4, "reuse_port": True}})
    inodes = _all_listening(server, 4)

    def held() -> set[int]:
        return set().union(*(_sockets_of(pid, inodes) for pid in server.worker_pids()))

    old = set(server.worker_pids())
    _reload(server, {"server": {"workers": 2}}, 1)
    _new_generation(server, old, 2)
    mark = server.mark()
    server.send_signal(signal.SIGTTIN)
    server.wait_for_log(r"workers: 3", since=mark)
    last = max(inodes)  # the last bound, as a rule: the highest place in the group

    def holders_of_last() -> list[int] | None:
        pids = server.worker_pids()
        holders = [pid for pid in pids if last in _sockets_of(pid, inodes)]
        return holders if len(pids) == 3 and len(holders) == 1 else None

    [victim] = server.wait_until(holders_of_last, 10, message="three workers")
    os.kill(victim, signal.SIGKILL)
    server.wait_until(lambda: victim not in server.worker_pids() and
                      len(server.worker_pids()) == 3, 10, message="a replacement")
    time.sleep(0.5)  # it has closed the sockets it inherited that are not its own
    assert held() == inodes
    for _ in range(20):  # whichever socket the kernel picks, someone accepts
        assert _hostname(server.port) == "mx.test.invalid"


def test_a_reload_during_crash_back_off_keeps_a_worker_accepting(make_server):
    """One of two workers keeps dying young, so its replacement waits longer each time
    (1.6 s after the fifth death). A HUP then starts the new generation at once, and the
    healthy worker serves until it is ready: every client is answered promptly."""
    server = make_server({"server": {"workers": 2, "hostname": "before.test"}})
    healthy, dying = server.worker_pids()
    for death in range(5):
        mark = server.mark()
        os.kill(dying, signal.SIGKILL)
        server.wait_for_log(rf"worker {dying} was killed by signal 9; replacing it", 5,
                            since=mark)
        if death < 4:
            dying = server.wait_until(
                lambda: [p for p in server.worker_pids() if p != healthy], 10,
                message="a replacement")[0]
    _reload(server, {"server": {"hostname": "after.test"}}, 1)
    answered = []
    until = time.monotonic() + 1.5
    while time.monotonic() < until:
        answered.append(_greeting(server.port, timeout=1.0)[:4])
        time.sleep(0.1)
    assert set(answered) == {b"220 "}
    server.wait_until(lambda: _hostname(server.port) == "after.test", 5,
                      message="the new generation")


def test_moving_a_listener_to_an_overlapping_address_is_refused_naming_both(make_server):
    """127.0.0.1:P to 0.0.0.0:P: the running workers hold 127.0.0.1:P until they stop,
    so the new socket cannot be bound; the reload is refused, saying why, and the server
    serves on where it was."""
    server = make_server({"server": {"workers": 1, "hostname": "before.test"}})
    port = server.port
    mark = server.mark()
    server.write_config({"server": {"listen": [f"0.0.0.0:{port}"], "hostname": "after.test"}})
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(
        rf"reload refused: cannot listen on 0\.0\.0\.0:{port}: it overlaps 127\.0\.0\.1:{port},"
        r" which the running workers listen on until they stop: moving a listener to an "
        r"address that overlaps its old one needs a restart; still running on the previous "
        r"configuration$", since=mark)
    assert _hostname(port) == "before.test"
    assert server.stop() == 0


def test_with_reuse_port_a_listener_moves_to_an_overlapping_address(make_server):
    """Both sockets SO_REUSEPORT: the kernel lets the new one listen beside the old, so
    the move needs no restart."""
    server = make_server({"server": {"workers": 1, "reuse_port": True,
                                     "hostname": "before.test"}})
    port = server.port
    server.reload({"server": {"listen": [f"0.0.0.0:{port}"], "hostname": "after.test"}})
    assert _hostname(port) == "after.test"
    assert server.count_log(r"reload refused") == 0
    assert server.stop() == 0
