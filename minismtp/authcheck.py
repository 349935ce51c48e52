"""Password checks on threads beside a worker's event loop, like delivery/group.py.

Untrusted input: user names and passwords from SMTP clients, passed through unread to
the verify function (htpasswd.Users.verify); and their number, which a client controls.

A bcrypt check costs tens of milliseconds of CPU by design; run in the event loop, every
AUTH would stall every other session of the worker. The loop submits each AuthAttempt
here and goes on serving; a few threads run the checks (bcrypt releases the GIL while it
hashes, so they run in parallel with the loop and each other) and wake the loop through
a socket, which then answers each attempt.

How the worker uses it, in order:

0. Per listener, the core's settings: `Settings(..., **core_settings(listener.auth))`
   (session.protocol_settings), and what checks its passwords: `verifier(listener.auth)`.
1. Once, after fork (threads do not survive a fork), if any listener offers AUTH:
   `checker = AuthChecker()`, and register `checker.wakeup` for reading in the selector.
2. On an `AuthAttempt` decision event from a session's core (the core is PAUSED), with
   `verify` its listener's verifier and `client` who sent it:
   `if not checker.submit(tag, verify, event.username, event.password, client):
   conn.reject(replies.AUTH_TEMPORARY_FAILURE)` at once: the queue is full (a flood of
   AUTH), 454 4.7.0 and the client may try again later. Otherwise leave it PAUSED. `tag`
   is whatever the worker needs back (logins.py: the session and the user name).
3. When `checker.wakeup` is readable: for each `(tag, ok)` in `checker.take_done()`,
   skip sessions closed meanwhile; else `conn.accept()` if ok is True (235;
   `conn.authenticated_as` is set), `conn.reject(replies.AUTH_FAILED)` if False (535
   5.7.8; logins.py answers it after a delay, which slows guessing down), or
   `conn.reject(replies.AUTH_TEMPORARY_FAILURE)` if None (454 4.7.0: the check itself
   failed) or SHED (454 4.7.0: dropped unrun, see below); then drain the core and
   flush, as after any decision.
4. At exit: `checker.stop()` (checks not yet started are dropped; running ones finish).

Log the user name and the outcome, never the password.

Fair to clients: the checks wait in one queue per client (logins.py's `client_of`: an
address, an IPv6 client's /64), and the threads take them a client at a time, in turn, so
that one address's flood delays another client's check by a turn, not by the whole
flood. When the queue is full, a new check from a client with fewer waiting takes the
place of the newest check of the client with the most, which is SHED: answered 454, as
a full queue's are. One address alone can fill the queue, but it cannot keep others out.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable, Generic, Hashable, Literal, TypeVar

from minismtp.msglog import printable
from minismtp.smtp.protocol import AUTH_MECHANISMS
from minismtp.threadwake import ThreadWakeup
from minismtp.values import ListenerAuth

log = logging.getLogger("minismtp.worker")

Tag = TypeVar("Tag")  # what the loop needs back with each result (its session)
Verify = Callable[[str, str], bool]  # (user, password) -> the password is right

DEFAULT_THREADS = 2
DEFAULT_MAX_QUEUED = 64  # waiting checks per worker; beyond, submit() refuses at once
SHED: Literal["shed"] = "shed"  # a result: dropped unrun, for another client's check
Result = bool | None | Literal["shed"]


def accept_any(user: str, password: str) -> bool:
    """A verify function for load tests (auth mode `accept_any`): every password is right."""
    return True


def core_settings(auth: ListenerAuth) -> dict[str, object]:
    """The `smtp.protocol.Settings` fields for a listener's `auth` mapping."""
    if not auth.offered:
        return {}
    return {"auth_mechanisms": AUTH_MECHANISMS, "auth_plaintext": auth.allow_plaintext,
            "auth_required": auth.require}


def verifier(auth: ListenerAuth) -> Verify | None:
    """What checks passwords for a listener (None: AUTH is off there). For htpasswd,
    the users config.load_config loaded."""
    if auth.mode == "accept_any":
        return accept_any
    if auth.mode == "htpasswd":
        if auth.users is None:
            raise ValueError("auth.users is loaded by config.load_config")
        return auth.users.verify
    return None


class AuthChecker(Generic[Tag]):
    """Runs password checks on `threads` threads; see the module docstring. Each check
    names its verify function, so listeners with different users files share one."""

    def __init__(self, threads: int = DEFAULT_THREADS,
                 max_queued: int = DEFAULT_MAX_QUEUED) -> None:
        if threads < 1 or max_queued < 1:
            raise ValueError("threads and max_queued must be at least 1")
        self.max_queued = max_queued
        self._cond = threading.Condition()
        # Each client's waiting checks, oldest first; the dict's order is the clients' turn.
        self._queued: dict[Hashable, collections.deque[tuple[Tag, Verify, str, str]]] = {}
        self._waiting = 0  # checks in all of them
        self._done: list[tuple[Tag, Result]] = []
        self._stopping = False
        self._wake = ThreadWakeup()
        self.wakeup = self._wake.sock  # the loop selects on it
        self._threads = [threading.Thread(target=self._run, name=f"auth-check-{n}",
                                          daemon=True) for n in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, tag: Tag, verify: Verify, user: str, password: str,
               client: Hashable = None) -> bool:
        """Queue `verify(user, password)` behind `client`'s other checks; its result comes
        back with `tag` through `take_done`. False: refused at once (the queue holds
        `max_queued` checks, none of another client with two more waiting than this one
        would have, or the checker stopped); answer 454 4.7.0
        (`replies.AUTH_TEMPORARY_FAILURE`)."""
        shed = False
        with self._cond:
            if self._stopping:
                return False
            queued = self._queued
            if self._waiting >= self.max_queued:
                heaviest = max(queued.values(), key=len)
                if len(heaviest) < len(queued.get(client, ())) + 2:
                    return False  # shedding would only move the unfairness
                self._done.append((heaviest.pop()[0], SHED))  # its newest check
                self._waiting -= 1
                shed = True
            mine = queued.get(client)
            if mine is None:
                mine = queued[client] = collections.deque()
            mine.append((tag, verify, user, password))
            self._waiting += 1
            self._cond.notify()
        if shed:
            self._wake.notify()
        return True

    def take_done(self) -> list[tuple[Tag, Result]]:
        """Finished checks: (tag, True) right, (tag, False) wrong, (tag, None) the check
        itself failed (logged), (tag, SHED) dropped unrun. Call when `wakeup` is
        readable."""
        self._wake.drain()
        with self._cond:
            done, self._done = self._done, []
        return done

    @property
    def queued(self) -> int:
        """Checks waiting for a thread (not those running)."""
        return self._waiting

    def stop(self) -> None:
        """Drop the checks not started, let the running ones finish, end the threads."""
        with self._cond:
            self._stopping = True
            self._queued.clear()
            self._waiting = 0
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()
        self._wake.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queued and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                queued = self._queued
                client = next(iter(queued))  # whose turn it is
                checks = queued.pop(client)
                tag, verify, user, password = checks.popleft()
                if checks:
                    queued[client] = checks  # its next check: after the other clients'
                self._waiting -= 1
            try:
                ok: bool | None = bool(verify(user, password))
            except Exception:  # a bug or a broken hash: the client gets 454, we the trace
                log.exception("password check for user %s failed", printable(user))
                ok = None
            del password
            with self._cond:
                self._done.append((tag, ok))
            self._wake.notify()
