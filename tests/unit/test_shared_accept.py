"""Two acceptors on one listening socket, stepped by hand: who takes a queued burst.

An acceptor knows no worker: each here has its own selector, and the sockets it hands
back stand for the sessions its worker would hold.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import time

import pytest

from minismtp import acceptor, balance
from minismtp.acceptor import Acceptor, Listening
from minismtp.heartbeat import NOT_ACCEPTING, HeartbeatBoard
from minismtp.poller import Poller

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="a burst is read from Linux's tcp_info")


class Taker:
    """An acceptor with what a worker would give it: a poller and its sessions."""

    def __init__(self, board: HeartbeatBoard, slot: int, listeners: list, cap: int = 4096
                 ) -> None:
        self.board, self.slot = board, slot
        self.poller = Poller()
        self.sessions: list[tuple] = []  # as accepted: (socket, address, listener)
        self.stop_requested = False
        board.hand_out(slot, time.monotonic())
        self.acceptor = Acceptor(self.poller, listeners, board, slot, True, self.sessions,
                                 self._read_signals, cap)
        self.acceptor.refresh()
        self.now = time.monotonic()

    def _read_signals(self) -> None:
        if self.stop_requested:
            self.acceptor.close()

    def dispose(self) -> None:
        for sock, _, _ in self.sessions:
            sock.close()
        self.poller.close()


@pytest.fixture
def shared():
    """A listening socket, a board, two acceptors on them, and a way to queue clients."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    listener.setblocking(False)
    board = HeartbeatBoard(4)
    takers = [Taker(board, slot, [listener]) for slot in (0, 1)]
    clients: list[socket.socket] = []

    def queue(count: int) -> None:
        for _ in range(count):
            clients.append(socket.create_connection(listener.getsockname()))
        deadline = time.monotonic() + 5
        while balance.queued(listener) != count:  # a busy machine completes them later
            assert time.monotonic() < deadline, f"{balance.queued(listener)} queued"
            time.sleep(0.005)

    yield takers, queue, listener
    for taker in takers:
        taker.dispose()
    for client in clients:
        client.close()
    listener.close()
    board.close()


def _step(taker: Taker, listener: socket.socket) -> None:
    """One wake-up on the listener, as the loop would run it."""
    taker.now = time.monotonic()
    for slot in (0, 1):  # both alive, however slowly this machine runs the test
        taker.board.beat(slot, taker.now)
    taker.sessions.extend(taker.acceptor.on_readable(listener, taker.now))
    taker.acceptor.publish_load()


def _end_deferral(taker: Taker) -> None:
    taker.sessions.extend(taker.acceptor.end_deferral())
    taker.acceptor.publish_load()


def _listening(taker: Taker, listener: socket.socket) -> bool:
    return listener.fileno() in taker.poller


def test_a_burst_is_split_evenly_and_the_rest_left_to_the_sibling(shared):
    (first, second), queue, listener = shared
    queue(20)
    _step(first, listener)  # its margin over the empty sibling, without a syscall more
    assert len(first.sessions) == balance.MARGIN
    assert first.board.loads[first.slot] == balance.MARGIN
    _step(first, listener)  # then up to half of everything, held and waiting
    assert len(first.sessions) == 10
    assert first.acceptor.deferred_until == 0.0
    _step(first, listener)  # its half taken, a burst waits: it leaves it to the sibling
    assert len(first.sessions) == 10
    assert first.acceptor.deferred_until == pytest.approx(first.now + balance.DEFER_S)
    assert not _listening(first, listener)
    # Not listening, so the sibling must not leave anything to it in turn.
    assert first.board.loads[first.slot] == NOT_ACCEPTING

    _step(second, listener)  # no sibling to share with meanwhile: it takes the rest
    assert len(second.sessions) == 10
    assert second.acceptor.deferred_until == 0.0

    _end_deferral(first)  # nothing left; it listens again
    assert len(first.sessions) == 10
    assert first.acceptor.deferred_until == 0.0 and _listening(first, listener)
    assert first.board.loads[first.slot] == 10


def test_the_sibling_takes_its_share_and_defers_in_turn(shared):
    (first, second), queue, listener = shared
    queue(30)
    _step(first, listener)
    _step(second, listener)  # may lead the first by the margin
    assert len(second.sessions) == 2 * balance.MARGIN
    _step(second, listener)  # then up to half of all 30
    assert len(second.sessions) == 15
    _step(second, listener)  # its half taken and a burst waits: its turn to defer
    assert second.acceptor.deferred_until > 0.0
    _step(first, listener)  # the second is not listening: the first takes the rest
    assert len(first.sessions) == 15


def test_a_sibling_that_never_comes_costs_one_deferral(shared):
    (first, second), queue, listener = shared
    queue(20)
    for _ in range(3):
        _step(first, listener)
    assert len(first.sessions) == 10
    assert first.acceptor.deferred_until > 0.0
    _end_deferral(first)  # the second never ran: the first takes what waits
    assert len(first.sessions) == 20
    assert len(second.sessions) == 0


def test_without_a_burst_a_worker_takes_what_is_queued(shared):
    (first, second), queue, listener = shared
    queue(11)
    _step(first, listener)  # its margin
    _step(first, listener)  # its half
    assert len(first.sessions) == 6
    _step(first, listener)  # 5 left: too few to wait for a sibling
    assert len(first.sessions) == 11
    assert first.acceptor.deferred_until == 0.0


def test_a_sibling_not_accepting_is_not_waited_for(shared):
    (first, second), queue, listener = shared
    second.board.loads[second.slot] = NOT_ACCEPTING  # as while it stops or is out of descriptors
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


def test_at_its_cap_a_worker_takes_only_a_few_to_refuse():
    """Beyond the cap each connection taken is refused: a wake-up takes the room left and
    REFUSALS_PER_WAKEUP more, not a whole MOST_PER_WAKEUP batch of descriptors."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    listener.setblocking(False)
    board = HeartbeatBoard(4)
    worker = Taker(board, 0, [listener], cap=3)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(60)]
    try:
        deadline = time.monotonic() + 5
        while balance.queued(listener) != 60:
            assert time.monotonic() < deadline, f"{balance.queued(listener)} queued"
            time.sleep(0.005)

        def wake_up() -> int:
            now = time.monotonic()
            board.beat(0, now)
            accepted = worker.acceptor.on_readable(listener, now)
            held = 3 - len(worker.sessions)
            worker.sessions.extend(accepted[:held])  # as the worker: sessions to the cap,
            for sock, _, _ in accepted[held:]:  # the rest refused and closed
                sock.close()
            return len(accepted)

        assert wake_up() == 3 + acceptor.REFUSALS_PER_WAKEUP
        assert len(worker.sessions) == 3
        assert [wake_up() for _ in range(3)] == [acceptor.REFUSALS_PER_WAKEUP] * 3
        assert balance.queued(listener) == 60 - 3 - 4 * acceptor.REFUSALS_PER_WAKEUP
        worker.sessions.pop()[0].close()  # a session ends: room for one more
        assert wake_up() == 1 + acceptor.REFUSALS_PER_WAKEUP
    finally:
        worker.dispose()
        for client in clients:
            client.close()
        listener.close()
        board.close()


class OutOfDescriptors:
    """A listening socket whose accept() fails as when the process has no fd left."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real

    def fileno(self) -> int:
        return self.real.fileno()

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)  # family, type, proto

    def _accept(self) -> tuple:
        raise OSError(errno.EMFILE, "Too many open files")

    def close(self) -> None:
        self.real.close()


@pytest.fixture
def two_listeners():
    """One acceptor on two listening sockets (an IPv4 and an IPv6 address, say); the first
    fails every accept with EMFILE."""
    plain = socket.create_server(("127.0.0.1", 0), backlog=128)
    failing = OutOfDescriptors(socket.create_server(("127.0.0.1", 0), backlog=128))
    for sock in (plain, failing.real):
        sock.setblocking(False)
    board = HeartbeatBoard(4)
    worker = Taker(board, 0, [failing, plain])
    client = socket.create_connection(plain.getsockname())
    yield worker, failing, plain
    worker.dispose()
    client.close()
    for sock in (plain, failing):
        sock.close()
    board.close()


def _registered(worker: Taker) -> int:
    return sum(isinstance(owner, Listening) for owner in worker.poller.owners())


def test_out_of_descriptors_pauses_both_listeners_until_a_later_tick(two_listeners):
    worker, failing, plain = two_listeners
    assert _registered(worker) == 2
    _step(worker, failing)
    assert worker.acceptor.paused_until > 0 and _registered(worker) == 0
    assert worker.board.loads[0] == NOT_ACCEPTING
    _step(worker, plain)  # an event of the same batch: nothing is taken while paused
    assert worker.sessions == []
    worker.acceptor.tick(time.monotonic())  # too early
    assert _registered(worker) == 0
    worker.acceptor.tick(worker.acceptor.paused_until)
    assert _registered(worker) == 2 and worker.board.loads[0] == 0
    _step(worker, plain)
    assert len(worker.sessions) == 1


def test_a_deferral_that_ends_out_of_descriptors_stays_paused(two_listeners):
    worker, failing, plain = two_listeners
    acceptor = worker.acceptor
    acceptor.deferred_until = time.monotonic() + balance.DEFER_S
    acceptor.refresh()
    assert _registered(worker) == 0
    _end_deferral(worker)  # listens, takes from the first listener: EMFILE
    assert acceptor.paused_until > 0 and acceptor.deferred_until == 0.0
    assert _registered(worker) == 0 and worker.sessions == []
    acceptor.tick(acceptor.paused_until)
    assert _registered(worker) == 2


def test_a_stop_while_deferred_or_paused_closes_the_listeners_once(two_listeners):
    worker, failing, plain = two_listeners
    acceptor = worker.acceptor
    _step(worker, failing)  # paused
    acceptor.deferred_until = time.monotonic()  # and deferred, as a batch could leave it
    acceptor.close()  # the worker stops
    assert _registered(worker) == 0 and acceptor.listeners == []
    assert plain.fileno() == -1  # closed
    assert worker.board.loads[0] == NOT_ACCEPTING
    _end_deferral(worker)
    acceptor.tick(acceptor.paused_until + 1)
    assert _registered(worker) == 0 and worker.board.loads[0] == NOT_ACCEPTING


def test_a_stop_read_before_accepting_takes_nothing(shared):
    (first, second), queue, listener = shared
    own = listener.dup()  # as a forked worker has its own descriptor of the shared socket
    stopping = Taker(first.board, 2, [own])
    queue(3)
    stopping.stop_requested = True  # a SIGTERM that arrived in the same batch of events
    _step(stopping, own)
    assert stopping.sessions == [] and stopping.acceptor.listeners == []
    assert own.fileno() == -1 and stopping.board.loads[2] == NOT_ACCEPTING
    _step(second, listener)  # the queue is left whole to the sibling
    assert len(second.sessions) == 3
    stopping.dispose()


class FailsOnce:
    """A listening socket whose next accept() fails once with `err`."""

    def __init__(self, real: socket.socket, err: int) -> None:
        self.real, self.err = real, err

    def fileno(self) -> int:
        return self.real.fileno()

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)

    def _accept(self) -> tuple:
        if self.err:
            err, self.err = self.err, 0
            raise OSError(err, os.strerror(err))
        return self.real._accept()


@pytest.mark.parametrize("err", [errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN,
                                 errno.EPERM, errno.ENOPROTOOPT, errno.ECONNABORTED])
def test_a_connection_that_failed_on_its_way_in_is_skipped(err):
    """accept(2) on Linux passes on network errors of the new connection, to be treated
    like EAGAIN: the next connection is taken, the worker goes on."""
    real = socket.create_server(("127.0.0.1", 0), backlog=16)
    real.setblocking(False)
    board = HeartbeatBoard(4)
    taker = Taker(board, 0, [FailsOnce(real, err)])
    client = socket.create_connection(real.getsockname())
    try:
        _end_deferral(taker)
        _step(taker, taker.acceptor.listeners[0])
        assert len(taker.sessions) == 1
    finally:
        taker.dispose()
        client.close()
        real.close()
        board.close()


def test_an_unexpected_accept_error_pauses_and_only_for_good_ends_the_worker(caplog):
    real = socket.create_server(("127.0.0.1", 0), backlog=16)
    real.setblocking(False)
    board = HeartbeatBoard(4)
    listener = FailsOnce(real, errno.EINVAL)
    taker = Taker(board, 0, [listener])
    try:
        _step(taker, listener)
        assert taker.sessions == [] and taker.acceptor.paused_until > time.monotonic()
        assert "accept: Invalid argument; pausing accepts" in caplog.text
        taker.acceptor.tick(taker.acceptor.paused_until)  # listening again
        client = socket.create_connection(real.getsockname())
        _step(taker, listener)  # it works again: the count starts over
        client.close()
        assert len(taker.sessions) == 1 and taker.acceptor.odd_errors == 0
        for _ in range(acceptor.MOST_ODD_ERRORS - 1):
            listener.err = errno.EINVAL
            _step(taker, listener)
            taker.acceptor.tick(taker.acceptor.paused_until)
        listener.err = errno.EINVAL
        with pytest.raises(OSError):  # broken for good: the master starts another worker
            _step(taker, listener)
    finally:
        taker.dispose()
        real.close()
        board.close()


class NeverEmpty:
    """A listener whose queue always holds more; its accept fails once when told."""

    def __init__(self, real: socket.socket) -> None:
        self.real, self.err = real, 0
        self.family, self.type, self.proto = real.family, real.type, real.proto

    def fileno(self) -> int:
        return self.real.fileno()

    def getsockopt(self, *args: object) -> object:
        return self.real.getsockopt(*args)

    def _accept(self) -> tuple:
        if self.err:
            err, self.err = self.err, 0
            raise OSError(err, os.strerror(err))
        return os.dup(self.real.fileno()), ("127.0.0.1", 1)


def test_accepts_that_work_between_odd_errors_start_the_count_over():
    """A busy worker's queue never empties (each wake-up ends at MOST_PER_WAKEUP): an odd
    error now and then, with accepts working between, must not end it."""
    real = socket.create_server(("127.0.0.1", 0), backlog=16)
    real.setblocking(False)
    board = HeartbeatBoard(4)
    listener = NeverEmpty(real)
    taker = Taker(board, 0, [listener])
    try:
        for _ in range(acceptor.MOST_ODD_ERRORS + 2):
            _step(taker, listener)  # a full wake-up of accepts that work
            listener.err = errno.EINVAL
            _step(taker, listener)  # then one odd error
            taker.acceptor.tick(taker.acceptor.paused_until)
        assert taker.acceptor.odd_errors == 1
    finally:
        taker.dispose()
        real.close()
        board.close()
