"""AuthChecker: bcrypt checks on threads while the calling thread stays responsive, the
bounded queue and its fairness to clients, failures of the check itself, and stop()."""

from __future__ import annotations

import selectors
import threading
import time

import bcrypt
import pytest

from minismtp.authcheck import SHED, AuthChecker, accept_any, core_settings, verifier
from minismtp.htpasswd import Users
from minismtp.smtp.protocol import Settings
from minismtp.values import ListenerAuth


def users(cost: int = 8) -> Users:
    lines = [f"user{n}:" + bcrypt.hashpw(f"pw{n}".encode(), bcrypt.gensalt(cost)).decode()
             for n in range(5)]
    return Users.parse("\n".join(lines).encode())


def wait_for(checker: AuthChecker, count: int, timeout_s: float = 60.0) -> list:
    """Results as an event loop would take them: select on `wakeup`, then take_done."""
    results: list = []
    with selectors.DefaultSelector() as selector:
        selector.register(checker.wakeup, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        while len(results) < count and time.monotonic() < deadline:
            if selector.select(timeout=0.5):
                results += checker.take_done()
    return results


def test_twenty_checks_while_the_loop_keeps_running():
    """The checks run beside the loop: it keeps turning, each turn short, while 20
    bcrypt checks complete with the right answers. No timing is asserted but a generous
    bound on the longest gap between turns."""
    table = users()
    checker: AuthChecker[int] = AuthChecker()
    try:
        expected = {}
        for n in range(20):
            user = f"user{n % 5}" if n % 4 else f"nobody{n}"  # some users do not exist
            password = f"pw{n % 5}" if n % 3 else "wrong"
            expected[n] = user.startswith("user") and password == f"pw{n % 5}"
            assert checker.submit(n, table.verify, user, password)
        results, turns, longest_gap = [], 0, 0.0
        last = time.monotonic()
        with selectors.DefaultSelector() as selector:
            selector.register(checker.wakeup, selectors.EVENT_READ)
            deadline = last + 120
            while len(results) < 20 and time.monotonic() < deadline:
                if selector.select(timeout=0.005):
                    results += checker.take_done()
                sum(range(1000))  # a little work per turn, as a loop does
                now = time.monotonic()
                longest_gap, last = max(longest_gap, now - last), now
                turns += 1
        assert dict(results) == expected
        assert any(expected.values()) and not all(expected.values())
        assert longest_gap < 1.0
        assert turns > 20  # the loop turned while the checks ran
    finally:
        checker.stop()


def test_a_full_queue_refuses_at_once():
    release = threading.Event()
    started = threading.Semaphore(0)

    def slow(user: str, password: str) -> bool:
        started.release()
        release.wait(30)
        return password == "right"

    checker: AuthChecker[str] = AuthChecker(threads=1, max_queued=3)
    try:
        assert checker.submit("a", slow, "u", "right")
        assert started.acquire(timeout=30)  # "a" is running, not queued
        assert all(checker.submit(tag, slow, "u", "wrong") for tag in "bcd")
        assert checker.queued == 3
        assert not checker.submit("e", slow, "u", "right")  # beyond the bound: no memory
        release.set()
        assert sorted(wait_for(checker, 4)) == [
            ("a", True), ("b", False), ("c", False), ("d", False)]
        assert checker.submit("f", slow, "u", "right")  # room again
        assert wait_for(checker, 1) == [("f", True)]
    finally:
        release.set()
        checker.stop()


def gated_checker(max_queued: int):
    """A one-thread checker whose first check holds the thread until `release` is set;
    the checks it runs are recorded in `ran`, by tag (the password)."""
    release = threading.Event()
    started = threading.Semaphore(0)
    ran: list[str] = []

    def slow(user: str, password: str) -> bool:
        ran.append(password)
        started.release()
        release.wait(30)
        return True

    checker: AuthChecker[str] = AuthChecker(threads=1, max_queued=max_queued)
    assert checker.submit("first", slow, "u", "first", "192.0.2.9")
    assert started.acquire(timeout=30)  # running, not queued
    return checker, slow, release, ran


def test_clients_take_turns():
    """A flood from one client waits behind one check of each other client, not the
    other way round."""
    checker, slow, release, ran = gated_checker(max_queued=64)
    try:
        for n in range(10):
            assert checker.submit(f"f{n}", slow, "u", f"f{n}", "198.51.100.7")
        assert checker.submit("a", slow, "u", "a", "203.0.113.1")
        assert checker.submit("b", slow, "u", "b", "203.0.113.2")
        assert checker.submit("a2", slow, "u", "a2", "203.0.113.1")
        release.set()
        assert len(wait_for(checker, 14)) == 14
        assert ran == ["first", "f0", "a", "b", "f1", "a2"] + [f"f{n}" for n in range(2, 10)]
        assert checker.queued == 0 and checker._queued == {}
    finally:
        release.set()
        checker.stop()


def test_a_full_queue_sheds_the_newest_check_of_the_client_with_most():
    checker, slow, release, ran = gated_checker(max_queued=4)
    try:
        for n in range(4):
            assert checker.submit(f"f{n}", slow, "u", f"f{n}", "198.51.100.7")
        # Full. Another client gets in: the flood's newest is dropped unrun, and answered.
        assert checker.submit("a", slow, "u", "a", "203.0.113.1")
        assert checker.take_done() == [("f3", SHED)]
        assert checker.queued == 4
        # The flood cannot take its place back: it would only move the unfairness.
        assert not checker.submit("f4", slow, "u", "f4", "198.51.100.7")
        # Nor can a client that already has as many waiting as the largest but one.
        assert checker.submit("b", slow, "u", "b", "203.0.113.2")  # sheds f2: 1+0 vs 3
        assert checker.take_done() == [("f2", SHED)]
        assert not checker.submit("a2", slow, "u", "a2", "203.0.113.1")  # 2 vs 1+1: refused
        release.set()
        results = wait_for(checker, 5)
        assert sorted(tag for tag, _ in results) == ["a", "b", "f0", "f1", "first"]
        assert ran == ["first", "f0", "a", "b", "f1"]
    finally:
        release.set()
        checker.stop()


def test_a_failing_check_is_a_temporary_failure(caplog):
    def broken(user: str, password: str) -> bool:
        raise ValueError("invalid salt")

    checker: AuthChecker[int] = AuthChecker()
    try:
        assert checker.submit(1, broken, "alice", "hunter2")
        assert wait_for(checker, 1) == [(1, None)]
    finally:
        checker.stop()
    assert "alice" in caplog.text and "hunter2" not in caplog.text


def test_a_check_that_fails_logs_the_user_escaped_and_cut(caplog):
    """The user name is client text: escaped (no forged fields or lines) and cut (no line
    past one atomic write), in the traceback's line as on the others."""
    def broken(user: str, password: str) -> bool:
        raise ValueError("Invalid salt")

    checker: AuthChecker[str] = AuthChecker(threads=1)
    try:
        assert checker.submit("s", broken, "a b\n" + "x" * 1000, "pw")
        deadline = time.monotonic() + 10
        done: list = []
        while not done and time.monotonic() < deadline:
            done = checker.take_done()
            time.sleep(0.01)
    finally:
        checker.stop()
    assert done == [("s", None)]
    [line] = [r.getMessage() for r in caplog.records if "password check" in r.getMessage()]
    assert line.startswith("password check for user a\\x20b\\x0axxx")
    assert line.endswith(f"...(+{1004 - 256}) failed")


def test_stop_drops_what_has_not_started():
    release = threading.Event()
    checker: AuthChecker[int] = AuthChecker(threads=1)
    for n in range(5):
        checker.submit(n, lambda user, password: release.wait(30), "u", "p")
    release.set()
    checker.stop()  # returns: the running check finishes, the queued ones are dropped
    assert not checker.submit(9, accept_any, "u", "p")


def test_accept_any_takes_every_password():
    assert accept_any("anyone", "") and accept_any("", "\x00" * 1000)


def test_bad_arguments():
    with pytest.raises(ValueError):
        AuthChecker(threads=0)


def test_listener_settings_and_verifiers():
    table = users(4)
    assert core_settings(ListenerAuth()) == {}
    assert verifier(ListenerAuth()) is None
    auth = ListenerAuth("htpasswd", "/users", require=True, users=table)
    assert core_settings(auth) == {"auth_mechanisms": ("PLAIN", "LOGIN"),
                                   "auth_plaintext": False, "auth_required": True}
    Settings(**core_settings(auth))  # the core takes them
    assert verifier(auth)("user1", "pw1") and not verifier(auth)("user1", "pw2")
    assert verifier(ListenerAuth("accept_any", allow_plaintext=True)) is accept_any
    assert core_settings(ListenerAuth("accept_any", allow_plaintext=True))["auth_plaintext"]
