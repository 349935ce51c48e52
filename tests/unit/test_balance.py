"""Sharing one listening queue: the accept rule, the burst test and the load board."""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest

from minismtp import balance
from minismtp.balance import BURST, MARGIN, accept_room, how_many, queued, share_room
from minismtp.heartbeat import NOT_ACCEPTING, HeartbeatBoard


@pytest.mark.parametrize("mine, lightest, most, room", [
    (0, None, 64, 64),  # no sibling to leave anything to
    (30, None, 64, 64),
    (0, 0, 64, MARGIN),  # may lead its lightest sibling by MARGIN sessions
    (MARGIN - 1, 0, 64, 1),
    (MARGIN, 0, 64, 0),
    (50, 3, 64, 0),
    (3, 50, 64, 50 + MARGIN - 3),
    (0, 100, 64, 64),  # never more than `most` at once
])
def test_accept_room_keeps_a_worker_within_margin_of_its_lightest_sibling(
        mine, lightest, most, room):
    assert accept_room(mine, lightest, most) == room


def _queue(listener: socket.socket, count: int) -> list[socket.socket]:
    before = queued(listener)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(count)]
    deadline = time.monotonic() + 5
    while queued(listener) != before + count:  # a busy machine completes them later
        assert time.monotonic() < deadline, f"{queued(listener)} queued, not {before + count}"
        time.sleep(0.005)
    return clients


@pytest.mark.parametrize("mine, others_total, others, waiting, room", [
    (0, 0, 1, 20, 10),  # 20 arriving together at two idle workers: half each
    (4, 0, 1, 16, 6),  # it took its margin already: up to half of everything
    (10, 0, 1, 10, 0),  # its half taken: the rest is the sibling's
    (10, 10, 1, 0, 0),
    (0, 9, 2, 0, 3),  # three workers, 9 sessions: 3 each
    (8, 3, 1, 2, -1),  # beyond its share: leave the rest, if worth waiting for
    (5, 0, 0, 7, 7),  # no sibling accepting: everything
])
def test_share_room_is_up_to_an_even_share_of_held_and_waiting_sessions(
        mine, others_total, others, waiting, room):
    assert share_room(mine, others_total, others, waiting) == room


def _never() -> int:
    raise AssertionError("the queue is read only once ahead of a sibling")


@pytest.mark.parametrize("mine, siblings, waiting, room", [
    (7, (None, 0, 0), _never, 64),  # alone: take what is there
    (0, (0, 0, 1), _never, MARGIN),  # within the margin: no syscall
    (MARGIN, (0, 0, 1), lambda: 16, 6),  # ahead: up to an even share of all 20
    (10, (0, 0, 1), lambda: 10, 0),  # share taken, a burst waits: leave it
    (10, (0, 0, 1), lambda: BURST - 1, 64),  # too few waiting to leave: take them
    (10, (0, 0, 1), lambda: None, 64),  # queue unreadable: as without balancing
])
def test_how_many_composes_margin_share_and_burst(mine, siblings, waiting, room):
    assert how_many(mine, siblings, waiting, 64) == room


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's tcp_info")
def test_queued_reads_the_accept_queue_length():
    with socket.create_server(("127.0.0.1", 0), backlog=64) as listener:
        assert queued(listener) == 0
        clients = _queue(listener, balance.BURST)
        assert queued(listener) == balance.BURST
        listener.accept()[0].close()
        assert queued(listener) == balance.BURST - 1
        for client in clients:
            client.close()


def test_queued_is_none_where_the_queue_cannot_be_read():
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as not_tcp:
        assert queued(not_tcp) is None


@pytest.fixture
def board():
    board = HeartbeatBoard(8)
    yield board
    board.close()


def test_no_sibling_until_the_master_hands_slots_out(board):
    assert board.siblings(0, now=10.0, max_age=3.0) == (None, 0, 0)
    board.hand_out(0, now=10.0)
    board.loads[0] = 0
    assert board.siblings(0, now=10.0, max_age=3.0) == (None, 0, 0)  # only itself


def test_siblings_are_the_live_accepting_workers_but_itself(board):
    for slot, load in enumerate([9, 7, 2, 5]):
        board.hand_out(slot, now=10.0)
        board.loads[slot] = load
    assert board.siblings(0, now=11.0, max_age=3.0) == (2, 14, 3)
    assert board.siblings(2, now=11.0, max_age=3.0) == (5, 21, 3)  # not itself
    board.loads[2] = NOT_ACCEPTING  # starting, paused, deferring or stopping
    assert board.siblings(0, now=11.0, max_age=3.0) == (5, 12, 2)
    board.beat(3, 6.0)  # silent for 5 s: it may be stuck
    assert board.siblings(0, now=11.0, max_age=3.0) == (7, 7, 1)
    board.vacate(1)
    assert board.siblings(0, now=11.0, max_age=3.0) == (None, 0, 0)


def test_hand_out_marks_the_slot_alive_but_not_accepting(board):
    board.hand_out(5, now=42.0)
    assert board.last(5) == 42.0
    assert board.loads[5] == NOT_ACCEPTING
    board.loads[5] = 0
    assert board.siblings(0, now=42.0, max_age=3.0) == (0, 0, 1)  # slots below 5: empty


def test_the_board_is_shared_with_forked_workers(board):
    board.hand_out(0, now=1.0)
    board.hand_out(1, now=1.0)
    pid = os.fork()
    if pid == 0:
        board.loads[1] = 17
        board.beat(1, 2.0)
        os._exit(0)
    os.waitpid(pid, 0)
    assert board.loads[1] == 17
    assert board.siblings(0, now=2.5, max_age=3.0) == (17, 17, 1)
