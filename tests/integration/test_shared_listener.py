"""Workers sharing one listening socket, live: a frozen sibling, a stop racing a connection.

How a burst is split is stepped by hand in tests/unit/test_shared_accept.py.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"),
                                reason="reads process states in /proc")


def _stopped(pids: list[int]) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    for pid in pids:  # wait until each is really stopped, not just signalled
        deadline = time.monotonic() + 5
        while open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "T":
            assert time.monotonic() < deadline, f"worker {pid} did not stop"
            time.sleep(0.005)


def test_a_frozen_sibling_delays_a_burst_by_moments_only(make_server, raw_clients):
    server = make_server({"server": {"workers": 2}, "delivery": {"backend": "discard"}})
    workers = server.wait_for_workers(2)
    time.sleep(0.3)  # both in their loops, listening: the frozen one looks alive and empty
    _stopped(workers)
    clients = [raw_clients(server.port) for _ in range(20)]
    frozen, awake = workers
    try:
        started = time.monotonic()
        os.kill(awake, signal.SIGCONT)  # its sibling looks alive and empty, but never runs
        for client in clients:
            client.expect(220, timeout=5.0)
        elapsed = time.monotonic() - started
    finally:
        os.kill(frozen, signal.SIGCONT)
    # One deferral (balance.DEFER_S, 20 ms), then it takes the rest; not a wait for ever.
    assert elapsed < 2.0, elapsed


def test_a_stopping_worker_leaves_queued_connections_to_its_sibling(make_server, raw_clients):
    server = make_server({"server": {"workers": 2}, "delivery": {"backend": "discard"}})
    first, second = server.wait_for_workers(2)
    _stopped([first, second])
    try:
        client = raw_clients(server.port)
        os.kill(first, signal.SIGTERM)  # delivered when it runs again, with the connection
        os.kill(first, signal.SIGCONT)
        time.sleep(0.2)
    finally:
        os.kill(second, signal.SIGCONT)
    # Not a greeting followed at once by 421: the stopping worker does not take it.
    client.expect(220)
    client.cmd("HELO client.test", 250)
    client.cmd("QUIT", 221)
    # The master replaces the worker that stopped on its own; a stop soon after must
    # reach the replacement even if it is still starting, not wait out the deadline.
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 5, "a worker missed the stop"

