"""Signals as counts plus a wakeup socket: a burst that fills the socket loses none."""

from __future__ import annotations

import os
import selectors
import signal

import pytest

from minismtp.signals import SignalWakeup

BURST, LAST = signal.SIGUSR1, signal.SIGUSR2


@pytest.fixture
def wakeup():
    wakeup = SignalWakeup()
    wakeup.install((BURST, LAST))
    yield wakeup
    wakeup.close((BURST, LAST))


def test_a_signal_after_a_burst_that_fills_the_wakeup_socket_still_arrives(wakeup):
    for _ in range(2000):  # a byte each: far more than the socketpair holds
        os.kill(os.getpid(), BURST)
    os.kill(os.getpid(), LAST)
    assert wakeup.pending()
    arrived = wakeup.read()
    assert arrived[LAST] == 1
    assert 1 <= arrived[BURST] <= 2000  # repeats may merge, as in the kernel
    assert not wakeup.pending()
    assert wakeup.read() == {}


def test_read_empties_the_socket_so_the_loop_sleeps_until_the_next_signal(wakeup):
    with selectors.DefaultSelector() as sel:
        sel.register(wakeup.sock, selectors.EVENT_READ)
        assert sel.select(0) == []
        os.kill(os.getpid(), LAST)
        assert len(sel.select(1.0)) == 1
        assert wakeup.read() == {LAST: 1}
        assert sel.select(0) == []


def test_close_forgets_what_was_noted():
    first = SignalWakeup()
    first.install((LAST,))
    os.kill(os.getpid(), LAST)
    first.close((LAST,))
    fresh = SignalWakeup()  # a new worker's, after fork: the master's signals are not its own
    try:
        assert not fresh.pending()
        assert fresh.read() == {}
    finally:
        fresh.close()
