"""The worker's poller: owners handed back with their readiness, trouble as both."""

from __future__ import annotations

import os
import select
import socket

import pytest

from minismtp.poller import READ, WRITE, Poller


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    poller = Poller()
    yield poller, a, b
    poller.close()
    a.close()
    b.close()


def test_owners_come_back_with_what_they_wait_for(pair):
    poller, a, b = pair
    owner = object()
    poller.register(a.fileno(), READ, owner)
    assert a.fileno() in poller and poller.owners() == [owner]
    assert poller.poll(0) == []  # nothing to read yet
    b.send(b"x")
    assert poller.poll(0) == [(owner, READ)]
    poller.modify(a.fileno(), WRITE)  # a socketpair with room is writable
    assert poller.poll(0) == [(owner, WRITE)]
    poller.unregister(a.fileno())
    assert a.fileno() not in poller and poller.poll(0) == []


def test_a_hang_up_is_reported_as_readable_and_writable(pair):
    poller, a, b = pair
    owner = object()
    poller.register(a.fileno(), READ, owner)
    b.close()  # the peer is gone: the owner's next read says so
    [(got, mask)] = poller.poll(0)
    assert got is owner and mask & READ and mask & WRITE


def test_waits_at_most_the_timeout(pair):
    poller, a, b = pair
    poller.register(a.fileno(), READ, "a")
    assert poller.poll(0.01) == []


EPOLL_ONLY = pytest.mark.skipif(not hasattr(select, "epoll"), reason="epoll's own set (Linux)")


@EPOLL_ONLY
def test_a_forgotten_descriptor_leaves_the_set_when_it_is_closed(pair):
    """forget() makes no system call: the close takes a connection out of epoll's set,
    and a new socket given the same descriptor number is watched afresh, for its owner."""
    poller, a, b = pair
    first, theirs = socket.socketpair()
    fd = first.fileno()
    poller.register(fd, READ, "first")
    theirs.send(b"x")
    poller.forget(fd)
    assert fd not in poller
    first.close()
    assert poller._poll.poll(0) == []  # readable when closed, yet the kernel reports nothing
    second, other = socket.socketpair()
    try:
        if second.fileno() != fd:  # make the number come back, as accept() would
            os.dup2(second.fileno(), fd)
            second.close()
            second = socket.socket(fileno=fd)
        poller.register(fd, READ, "second")
        assert poller.poll(0) == []
        other.send(b"y")
        assert poller.poll(0) == [("second", READ)]
    finally:
        second.close()
        other.close()
        theirs.close()


@EPOLL_ONLY
def test_a_forgotten_descriptor_left_open_is_dropped_when_it_is_reported(pair):
    """Were a close to fail, the descriptor would stay in the set, level-triggered,
    reported at every wake-up with no owner: the first such report unregisters it."""
    poller, a, b = pair
    poller.register(a.fileno(), READ, "a")
    poller.forget(a.fileno())
    b.send(b"x")
    assert poller.poll(0) == []
    with pytest.raises(FileNotFoundError):
        poller._poll.unregister(a.fileno())  # no longer there
