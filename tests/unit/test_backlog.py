"""How many queued connections a worker takes per wake-up, and reading the queue length."""

from __future__ import annotations

import socket
import sys
import time

import pytest

from minismtp.backlog import ACCEPTS_PER_WAKEUP, SHARE_PART, accept_quota, queued


@pytest.mark.parametrize("pending, sharers, quota", [
    (None, 2, ACCEPTS_PER_WAKEUP),  # queue length unknown: drain as before
    (500, 1, ACCEPTS_PER_WAKEUP),  # the queue is ours alone (one worker, or reuse_port)
    (0, 2, 1),  # woken for a connection another worker took: still try once
    (1, 2, 1),
    (2 * SHARE_PART - 1, 2, 1),
    (20, 2, 20 // (2 * SHARE_PART)),  # 20 long sessions at once: a few each time
    (100, 2, 100 // (2 * SHARE_PART)),
    (100, 4, 100 // (4 * SHARE_PART)),
    (1000, 2, ACCEPTS_PER_WAKEUP),  # a queue that built up: as many as one wake-up allows
])
def test_a_worker_takes_a_part_of_its_share_of_the_queue(pending, sharers, quota):
    assert accept_quota(pending, sharers) == quota


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's tcp_info")
def test_queued_counts_connections_waiting_to_be_accepted():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        assert queued(listener) == 0
        clients = [socket.create_connection(listener.getsockname()) for _ in range(7)]
        try:
            deadline = time.monotonic() + 5
            while queued(listener) != 7 and time.monotonic() < deadline:
                time.sleep(0.01)  # handshakes complete in the kernel, asynchronously
            assert queued(listener) == 7
            listener.accept()[0].close()
            assert queued(listener) == 6
        finally:
            for client in clients:
                client.close()


def test_queued_is_unknown_for_a_socket_without_tcp_info():
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        assert queued(unix) is None
