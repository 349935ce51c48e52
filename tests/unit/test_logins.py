"""Logins, a worker's AUTH answers, with the real core and checker and a stand-in loop:
right, wrong (late, on the loop's timers), refused when too many wait, dropped for a
closed session; the counters; the password in no log record."""

from __future__ import annotations

import base64
import logging
import selectors
import threading
import time
from types import SimpleNamespace

import pytest

from minismtp.authcheck import AuthChecker
from minismtp.delivery import Peer
from minismtp.logins import FAILURE_DELAY_S, Logins, client_of
from minismtp.smtp import replies as R
from minismtp.smtp.events import NEED_DATA, AuthAttempt
from minismtp.smtp.protocol import AUTH_MECHANISMS, Settings, SmtpServerConnection
from minismtp.stats import WorkerStats
from minismtp.timers import Timers
from minismtp.values import ListenerAuth

SETTINGS = Settings(auth_mechanisms=AUTH_MECHANISMS, auth_plaintext=True)
SECRET = "s3cret-never-logged"


class Loop:
    """What Logins sees of the worker: the clock, the timers, resume()."""

    def __init__(self) -> None:
        self.now = time.monotonic()
        self.timers = Timers()
        self.resumed: list[object] = []

    def resume(self, session) -> None:
        self.resumed.append(session)


def session_at_auth(password: str, settings: Settings = SETTINGS, address: str = "192.0.2.1"):
    """A session whose core has just given an AuthAttempt for alice."""
    conn = SmtpServerConnection(settings)
    conn.greet()
    token = base64.b64encode(f"\0alice\0{password}".encode())
    conn.receive_data(b"EHLO client.test\r\nAUTH PLAIN " + token + b"\r\n")
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, AuthAttempt):
            break
        conn.accept()
    assert isinstance(events[-1], AuthAttempt)
    conn.data_to_send()
    return SimpleNamespace(conn=conn, peer=Peer(address, 40000), paused=False,
                           closed=False, deadline=0.0, timer_at=float("inf"), tarpits=None), events[-1]


def verify(user: str, password: str) -> bool:
    return user == "alice" and password == "right"


@pytest.fixture
def logins():
    loop = Loop()
    stats = WorkerStats(0)
    made = Logins(loop, stats, [(SETTINGS, ListenerAuth(mode="accept_any"))])
    made._verifiers[id(SETTINGS)] = (SETTINGS, verify)  # a cheap verify for the tests
    yield made
    made.stop()


def wait_done(logins: Logins, timeout_s: float = 10.0) -> None:
    """Wait for the checker's wakeup, then call on_done, as the loop does."""
    with selectors.DefaultSelector() as selector:
        selector.register(logins.wakeup, selectors.EVENT_READ)
        assert selector.select(timeout=timeout_s), "no check finished"
    logins.loop.now = time.monotonic()
    logins.on_done()


def test_a_right_password_is_answered_at_once(logins):
    session, attempt = session_at_auth("right")
    logins.submit(session, attempt)
    assert session.paused
    wait_done(logins)
    assert not session.paused and logins.loop.resumed == [session]
    assert session.conn.data_to_send() == R.AUTH_OK.wire
    assert session.conn.authenticated_as == "alice"
    assert logins.stats.auth_successes == 1


def test_a_wrong_password_is_answered_after_the_delay(logins, caplog):
    session, attempt = session_at_auth(SECRET)
    caplog.set_level(logging.DEBUG)
    logins.submit(session, attempt)
    wait_done(logins)
    loop = logins.loop
    assert session.paused and not loop.resumed  # nothing yet: the delay runs
    assert session.conn.data_to_send() == b""
    loop.timers.expire(loop.now + FAILURE_DELAY_S * 0.5, lambda owner: None)
    assert session.paused
    loop.timers.expire(loop.now + FAILURE_DELAY_S, lambda owner: None)
    assert not session.paused and loop.resumed == [session]
    assert session.conn.data_to_send() == R.AUTH_FAILED.wire
    assert session.conn.authenticated_as is None and session.conn.errors == 1
    assert (logins.stats.auth_failures, logins.stats.replies[535]) == (1, 1)
    assert "user=alice failed" in caplog.text
    assert SECRET not in caplog.text


def test_acting_as_another_user_fails_as_a_wrong_password_does(logins, caplog):
    """An authzid other than the user: refused unchecked, but answered late, counted and
    logged as any failed login, so that monitoring of failed logins sees it."""
    conn = SmtpServerConnection(SETTINGS)
    conn.greet()
    token = base64.b64encode(b"root\0alice\0right")  # alice's right password, as root
    conn.receive_data(b"EHLO client.test\r\nAUTH PLAIN " + token + b"\r\n")
    conn.next_event()
    conn.accept()
    attempt = conn.next_event()
    conn.data_to_send()
    session = SimpleNamespace(conn=conn, peer=Peer("192.0.2.1", 40000), paused=False,
                              closed=False, deadline=0.0, timer_at=float("inf"), tarpits=None)
    caplog.set_level(logging.INFO)
    logins.submit(session, attempt)
    loop = logins.loop
    assert session.paused and conn.data_to_send() == b""
    assert logins.checker.take_done() == []  # no password check was asked for
    loop.timers.expire(loop.now + FAILURE_DELAY_S * 0.5, lambda owner: None)
    assert session.paused
    loop.timers.expire(loop.now + FAILURE_DELAY_S, lambda owner: None)
    assert not session.paused and loop.resumed == [session]
    assert conn.data_to_send() == R.AUTH_FAILED.wire
    assert conn.authenticated_as is None and conn.errors == 1
    assert (logins.stats.auth_failures, logins.stats.replies[535]) == (1, 1)
    assert "auth: peer=192.0.2.1 user=alice as root failed" in caplog.text


def test_a_closed_session_gets_nothing(logins):
    right, attempt = session_at_auth("right")
    logins.submit(right, attempt)
    wrong, attempt = session_at_auth("wrong")
    logins.submit(wrong, attempt)
    right.closed = wrong.closed = True  # both clients left while their checks ran
    deadline = time.monotonic() + 10
    while len(logins.checker._done) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    wait_done(logins)
    logins.loop.timers.expire(logins.loop.now + 2 * FAILURE_DELAY_S, lambda owner: None)
    assert logins.loop.resumed == []
    assert right.conn.data_to_send() == wrong.conn.data_to_send() == b""
    assert logins.stats.auth_successes == logins.stats.auth_failures == 0


def test_a_full_queue_gets_454_at_once():
    loop, stats = Loop(), WorkerStats(0)
    checker: AuthChecker = AuthChecker(threads=1, max_queued=1)
    logins = Logins(loop, stats, [(SETTINGS, ListenerAuth(mode="accept_any"))], checker)
    gate = threading.Event()
    logins._verifiers[id(SETTINGS)] = (SETTINGS, lambda user, password: gate.wait(10))
    try:
        # Three clients, so that none has more waiting than another's share.
        sessions = [session_at_auth("x", address=f"192.0.2.{n}") for n in (1, 2, 3)]
        for session, attempt in sessions:
            logins.submit(session, attempt)
            time.sleep(0.05)  # the first is taken by the thread, the second waits
        third = sessions[2][0]
        assert not third.paused
        assert third.conn.data_to_send() == R.AUTH_TEMPORARY_FAILURE.wire
        assert (stats.auth_temporary_failures, stats.replies[454]) == (1, 1)
    finally:
        gate.set()
        logins.stop()


def test_a_floods_shed_check_gets_454_and_the_other_client_gets_in(caplog):
    """One thread, busy; a queue of 2, full of one address's checks: another client's
    check takes the place of the flood's newest, which is answered 454."""
    loop, stats = Loop(), WorkerStats(0)
    checker: AuthChecker = AuthChecker(threads=1, max_queued=2)
    logins = Logins(loop, stats, [(SETTINGS, ListenerAuth(mode="accept_any"))], checker)
    gate = threading.Event()
    logins._verifiers[id(SETTINGS)] = (SETTINGS, lambda user, password: gate.wait(10))
    try:
        flood = [session_at_auth("x", address="2001:db8:7:7::1") for _ in range(3)]
        for session, attempt in flood:
            logins.submit(session, attempt)
            time.sleep(0.05)  # the first is taken by the thread, the others wait
        assert [session.paused for session, _ in flood] == [True, True, True]
        # Another address of the same /64 is the same client: refused at once.
        same, attempt = session_at_auth("x", address="2001:db8:7:7:ffff::2")
        logins.submit(same, attempt)
        assert not same.paused
        assert same.conn.data_to_send() == R.AUTH_TEMPORARY_FAILURE.wire
        other, attempt = session_at_auth("x", address="198.51.100.1")
        logins.submit(other, attempt)
        assert other.paused
        wait_done(logins)
        newest = flood[2][0]
        assert not newest.paused and newest in loop.resumed
        assert newest.conn.data_to_send() == R.AUTH_TEMPORARY_FAILURE.wire
        assert (stats.auth_temporary_failures, stats.replies[454]) == (2, 2)
        assert "most of them this client's" in caplog.text
    finally:
        gate.set()
        logins.stop()


@pytest.mark.parametrize(("address", "client"), [
    ("192.0.2.1", "192.0.2.1"),
    ("::ffff:192.0.2.1", "192.0.2.1"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("not an address", "not an address"),
])
def test_a_client_is_an_ipv4_address_or_an_ipv6_64(address, client):
    assert client_of(address) == client


def test_no_threads_where_no_listener_offers_auth():
    assert Logins.maybe(Loop(), WorkerStats(0), [(Settings(), ListenerAuth())]) is None


def test_accept_any_is_answered_at_once_without_the_checker():
    loop, stats = Loop(), WorkerStats(0)
    checker: AuthChecker = AuthChecker(threads=1, max_queued=1)
    logins = Logins(loop, stats, [(SETTINGS, ListenerAuth(mode="accept_any"))], checker)
    try:
        session, attempt = session_at_auth("anything at all")
        logins.submit(session, attempt)
        assert not session.paused and loop.resumed == []  # answered in the same call
        assert session.conn.data_to_send() == R.AUTH_OK.wire
        assert session.conn.authenticated_as == "alice"
        assert stats.auth_successes == 1
        assert checker.take_done() == []  # nothing went to a thread
    finally:
        logins.stop()
