"""AUTH in a worker: each AuthAttempt checked on authcheck.py's threads, answered later
(`accept_any` has nothing to check: answered at once, in the loop).

Untrusted input: the user name and password of an AuthAttempt (decoded by the core,
bounded by its line limit), handed to the listener's verify function as data; and how
often a client tries, which it controls.

The order of calls is authcheck.py's. The session is `paused` from the attempt until its
answer has been given, as for a deferred commit (storage.py): the loop reads nothing
more from it meanwhile and serves the other sessions. A wrong password is answered only
after FAILURE_DELAY_S, on the loop's timers, so that one connection cannot try passwords
faster than one a second; the core's error budget (max_errors) then ends it with 421.
The checks of one client (`client_of`) wait in turn with other clients', not before them
(authcheck.py), so many connections from one address cannot keep others' checks out.

The password goes to the checker and nowhere else: not into logs, replies, counters or
exception text. The user name is logged (escaped: it may hold any bytes).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from typing import TYPE_CHECKING, Iterable

from minismtp import authcheck
from minismtp.authcheck import AuthChecker, Verify
from minismtp.msglog import printable
from minismtp.output import end_tarpitted_reply
from minismtp.smtp import replies
from minismtp.smtp.events import AuthAttempt
from minismtp.smtp.protocol import Settings
from minismtp.stats import WorkerStats
from minismtp.values import ListenerAuth

if TYPE_CHECKING:
    import socket

    from minismtp.loop import Loop
    from minismtp.session import Session

log = logging.getLogger("minismtp.worker")

# A wrong password is answered this long after the check (Postfix's smtpd_error_sleep_time
# idea): guessing costs a client a second per try, and max_errors tries per connection.
# Right passwords and temporary failures are answered at once.
FAILURE_DELAY_S = 1.0


def client_of(address: str) -> str:
    """Whose check this is, for the checker's turns: an IPv4 address (an IPv4-mapped one
    unmapped), or an IPv6 address's /64 (one host has a /64 or more to pick from)."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.partition("%")[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


class Logins:
    """Checks the AUTH attempts of a worker's sessions; see the module docstring.

    `profiles` pairs each listener's core Settings (made once per worker and shared by
    all its connections, so a connection's `conn.settings` names its listener) with the
    listener's `auth` mapping.
    """

    def __init__(self, loop: Loop, stats: WorkerStats,
                 profiles: Iterable[tuple[Settings, ListenerAuth]],
                 checker: AuthChecker[tuple[Session, str]] | None = None) -> None:
        self.loop = loop
        self.stats = stats
        # By identity: listeners with equal settings may still check different users files.
        # The Settings is kept beside its verifier, so its id() cannot be reused.
        self._verifiers: dict[int, tuple[Settings, Verify]] = {}
        for settings, auth in profiles:
            verify = authcheck.verifier(auth)
            if verify is not None:
                self._verifiers[id(settings)] = (settings, verify)
        # Each check carries its session and user name back (the name for the log line).
        self.checker: AuthChecker[tuple[Session, str]] = checker or AuthChecker()

    @classmethod
    def maybe(cls, loop: Loop, stats: WorkerStats,
              profiles: list[tuple[Settings, ListenerAuth]]) -> Logins | None:
        """Logins for a worker whose listeners offer AUTH; None (no threads) if none does."""
        if not any(auth.offered for _, auth in profiles):
            return None
        return cls(loop, stats, profiles)

    @property
    def wakeup(self) -> socket.socket:
        """Readable when checks are done: the loop then calls `on_done`."""
        return self.checker.wakeup

    def submit(self, session: Session, event: AuthAttempt) -> None:
        """Check the attempt on a thread; the session waits, paused, for `on_done`."""
        if event.acts_as_other:  # no proxy authorization here: a failed login, unchecked
            session.paused = True
            self._fail_later(session, event.username, f" as {printable(event.authzid)}")
            return
        entry = self._verifiers.get(id(session.conn.settings))
        if entry is None:  # the core offers AUTH only where a verifier exists
            self._temporary(session, "no password check for this listener")
            return
        if entry[1] is authcheck.accept_any:  # nothing to check: no thread, no wait
            self.stats.auth_successes += 1
            session.conn.accept()
            return
        if not self.checker.submit((session, event.username), entry[1], event.username,
                                   event.password, client_of(session.peer.address)):
            self._temporary(session, "too many checks waiting")
            return
        session.paused = True

    def on_done(self) -> None:
        """Answer the sessions whose checks finished (those closed meanwhile are gone)."""
        loop = self.loop
        for (session, user), ok in self.checker.take_done():
            if session.closed:
                continue
            if ok is False:
                self._fail_later(session, user)
                continue
            session.paused = False
            if ok is authcheck.SHED:
                self._temporary(session, "too many checks waiting, most of them this client's")
            elif ok:
                self.stats.auth_successes += 1
                session.conn.accept()  # the user shows as user= on the log lines
            else:
                self._temporary(session, "the check failed")
            if session.tarpits:
                end_tarpitted_reply(session)
            loop.resume(session)

    def _fail_later(self, session: Session, user: str, acting_as: str = "") -> None:
        """535 after FAILURE_DELAY_S; the session stays paused (nothing more is read from
        it) until the answer has gone."""
        loop = self.loop
        loop.timers.call_at(loop.now + FAILURE_DELAY_S,
                            functools.partial(self._answer_failure, user=user,
                                              acting_as=acting_as), session)

    def _answer_failure(self, session: Session, user: str, acting_as: str) -> None:
        if session.closed:
            return
        session.paused = False
        self.stats.auth_failures += 1
        self.stats.replies[replies.AUTH_FAILED.code] += 1
        session.conn.reject(replies.AUTH_FAILED)
        log.info("auth: peer=%s user=%s%s failed", session.peer.address, printable(user),
                 acting_as)
        if session.tarpits:
            end_tarpitted_reply(session)
        self.loop.resume(session)

    def _temporary(self, session: Session, why: str) -> None:
        self.stats.auth_temporary_failures += 1
        self.stats.replies[replies.AUTH_TEMPORARY_FAILURE.code] += 1
        log.warning("auth: peer=%s temporary failure: %s", session.peer.address, why)
        session.conn.reject(replies.AUTH_TEMPORARY_FAILURE)

    def stop(self) -> None:
        self.checker.stop()

