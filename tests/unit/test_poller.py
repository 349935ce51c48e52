"""The worker's poller: owners handed back with their readiness, trouble as both."""

from __future__ import annotations

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
