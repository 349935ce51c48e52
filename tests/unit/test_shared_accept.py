"""Two real workers on one listening socket, stepped by hand: who takes a queued burst."""

from __future__ import annotations

import socket
import sys
import time

import pytest

from minismtp import balance
from minismtp.config import load_config
from minismtp.delivery import make_backend
from minismtp.heartbeat import NOT_ACCEPTING, HeartbeatBoard
from minismtp.stats import StatsBoard
from minismtp.worker import Worker

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="a burst is read from Linux's tcp_info")


@pytest.fixture
def shared():
    """A listening socket, a board, two workers on them, and a way to queue clients."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    listener.setblocking(False)
    board = HeartbeatBoard(4)
    stats_board = StatsBoard(4, 64)
    config = load_config(overrides={"delivery.backend": "discard"})
    workers = []
    for slot in (0, 1):
        backend = make_backend("discard", "", False, "single", config.server.hostname)
        board.hand_out(slot, time.monotonic())
        worker = Worker(config, [listener], backend, board, slot, stats_board)
        worker.acceptor.listen()
        workers.append(worker)
    clients: list[socket.socket] = []

    def queue(count: int) -> None:
        for _ in range(count):
            clients.append(socket.create_connection(listener.getsockname()))
        time.sleep(0.05)  # the handshakes complete in the kernel

    yield workers, queue, listener
    for worker in workers:
        for session in list(worker.sessions.values()):
            worker._close(session, "")
        worker.sel.close()
    for client in clients:
        client.close()
    listener.close()
    board.close()


def _step(worker: Worker, listener: socket.socket) -> None:
    """One wake-up on the listener, as the loop would run it."""
    worker.now = time.monotonic()
    worker.acceptor.on_readable(listener)


def _listening(worker: Worker, listener: socket.socket) -> bool:
    return listener in [key.fileobj for key in worker.sel.get_map().values()]


def test_a_burst_is_left_to_the_sibling_beyond_the_margin(shared):
    (first, second), queue, listener = shared
    queue(20)
    _step(first, listener)  # its margin over the empty sibling
    assert len(first.sessions) == balance.MARGIN + 1
    assert first.acceptor.deferred_until == 0.0
    assert first.loads[first.slot] == balance.MARGIN + 1
    _step(first, listener)  # still queued: a burst waits, and the sibling is lighter
    assert len(first.sessions) == balance.MARGIN + 1
    assert first.acceptor.deferred_until == pytest.approx(first.now + balance.DEFER_S)
    assert not _listening(first, listener)
    # Not listening, so the sibling must not leave anything to it in turn.
    assert first.loads[first.slot] == NOT_ACCEPTING

    _step(second, listener)  # no sibling to share with meanwhile: it takes the rest
    assert len(second.sessions) == 20 - (balance.MARGIN + 1)
    assert second.acceptor.deferred_until == 0.0

    first.acceptor.end_deferral()  # nothing left; it listens again
    assert len(first.sessions) == balance.MARGIN + 1
    assert first.acceptor.deferred_until == 0.0 and _listening(first, listener)
    assert first.loads[first.slot] == balance.MARGIN + 1


def test_the_lighter_worker_takes_its_share_of_a_burst_first(shared):
    (first, second), queue, listener = shared
    queue(30)
    _step(first, listener)
    _step(second, listener)  # may lead the first by the margin
    assert len(second.sessions) == 2 * (balance.MARGIN + 1)
    _step(second, listener)  # ahead and a burst still waits: its turn to defer
    assert second.acceptor.deferred_until > 0.0
    _step(first, listener)  # the second is not listening: take the rest
    assert len(first.sessions) == 30 - 2 * (balance.MARGIN + 1)


def test_a_sibling_that_never_comes_costs_one_deferral(shared):
    (first, second), queue, listener = shared
    queue(20)
    _step(first, listener)
    _step(first, listener)
    assert len(first.sessions) == balance.MARGIN + 1
    assert first.acceptor.deferred_until > 0.0
    first.acceptor.end_deferral()  # the second never ran: the first takes what waits
    assert len(first.sessions) == 20
    assert len(second.sessions) == 0


def test_without_a_burst_a_worker_takes_what_is_queued(shared):
    (first, second), queue, listener = shared
    queue(balance.BURST - 1 + balance.MARGIN + 1)
    _step(first, listener)  # its share, and the rest is too few to wait for a sibling
    _step(first, listener)
    assert len(first.sessions) == balance.BURST + balance.MARGIN
    assert first.acceptor.deferred_until == 0.0


def test_a_sibling_not_accepting_is_not_waited_for(shared):
    (first, second), queue, listener = shared
    second.loads[second.slot] = NOT_ACCEPTING  # as while it stops or is out of descriptors
    queue(20)
    _step(first, listener)
    assert len(first.sessions) == 20
    assert first.acceptor.deferred_until == 0.0


def test_with_reuse_port_a_worker_takes_its_own_queue(shared):
    (first, second), queue, listener = shared
    first.acceptor.balancing = False  # what reuse_port sets: the queue is this worker's alone
    queue(20)
    _step(first, listener)
    assert len(first.sessions) == 20
