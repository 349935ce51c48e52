"""TLS handshakes in a worker's loop: at accept on an implicit-TLS listener (RFC 8314),
and after the `220` to STARTTLS (RFC 3207).

Untrusted input: the client's handshake bytes (or garbage, or an HTTP request, or
nothing at all), which OpenSSL parses; here only the outcome is handled: done, wants
READ or WRITE, or failed with a short reason.

While a handshake runs, the connection's owner in the poller is its `Handshake`, not
the session, so the loop's path for sessions stays as it was; the session's own
deadline is the handshake's (its listener's `limits.tls_handshake_timeout`), and a
session whose handshake fails or stalls is closed without a word: no plaintext reply can
be read by a client in the middle of a handshake. A stopping worker lets handshakes in progress
finish (briefly), then answers 421 under TLS.
"""

from __future__ import annotations

import logging
import ssl
import time
from typing import TYPE_CHECKING, Callable

from minismtp import tls
from minismtp.poller import Poller
from minismtp.smtp.protocol import State
from minismtp.stats import WorkerStats
from minismtp.tlstransport import HandshakeFailed, TlsTransport

if TYPE_CHECKING:
    import socket

    from minismtp.loop import Loop
    from minismtp.session import Session

log = logging.getLogger("minismtp.worker")

# A stopping worker waits this long for handshakes in progress: a real client's takes a
# few round trips; one that sent nothing or stalled is not worth holding the stop for.
STOP_GRACE_S = 2.0


class Handshake:
    """The poller's owner of a connection while its TLS handshake runs."""

    __slots__ = ("session", "mask", "started")

    def __init__(self, session: Session, started: float) -> None:
        self.session = session
        self.mask = 0  # what the poller watches for it: READ, WRITE or 0
        self.started = started


class Handshakes:
    def __init__(self, loop: Loop, poller: Poller, context: ssl.SSLContext,
                 stats: WorkerStats, greet: Callable[[Session], None]) -> None:
        self.loop = loop
        self.poller = poller
        self.context = context
        self.stats = stats
        self.greet = greet  # implicit TLS: the session's greeting, once TLS is up
        self.stopping = False

    def begin_implicit(self, session: Session, sock: socket.socket) -> None:
        session.transport = TlsTransport.wrap(sock, self.context)
        self._begin(session)

    def begin_starttls(self, session: Session) -> None:
        """The 220 went out whole: the same connection goes on under TLS."""
        self.loop.want(session, 0)  # the plain transport's socket is about to be detached
        session.transport = session.transport.start_tls(self.context)
        self._begin(session)

    def _begin(self, session: Session) -> None:
        loop = self.loop
        session.handshake = Handshake(session, time.monotonic())
        timeout = session.profile.tls_handshake_timeout
        if self.stopping:  # begun after the stop (a PROXY header or a STARTTLS in its grace)
            timeout = min(timeout, STOP_GRACE_S)
        loop.timers.set_deadline(session, loop.now + timeout)
        self.step(session.handshake)

    def step(self, handshake: Handshake) -> None:
        """The connection is ready (or the handshake begins): move it on."""
        session = handshake.session
        transport = session.transport
        try:
            done = transport.handshake()
        except HandshakeFailed as exc:
            self._failed(session, exc.reason)
            return
        if not done:
            self._watch(handshake, transport.handshake_wants)
            return
        self._watch(handshake, 0)
        session.handshake = None
        stats = self.stats
        stats.tls_sessions += 1
        stats.observe_handshake(time.monotonic() - handshake.started)
        conn = session.conn
        was_starttls = conn.state is State.STARTING_TLS
        conn.tls_started(tls.describe(transport.sock))
        if was_starttls:
            stats.tls_discarded_bytes += conn.discarded_after_starttls
            if conn.discarded_after_starttls:
                log.info("starttls: peer=%s sent %d bytes after STARTTLS; discarded",
                         session.peer.address, conn.discarded_after_starttls)
        loop = self.loop
        loop.timers.set_deadline(session, loop.now + session.profile.command_timeout)
        if was_starttls:
            loop.resume(session)  # the client speaks first: EHLO again
        else:
            self.greet(session)
        if not session.closed and transport.has_buffered_input:
            loop.read(session)  # records came with the last flight: select() cannot see them

    def expire(self, session: Session) -> None:
        """The handshake's deadline passed (or the grace of a stopping worker)."""
        self._failed(session, "stopping" if self.stopping else "timeout")

    def stop(self) -> None:
        """The worker stops: handshakes begun from now on get STOP_GRACE_S at most."""
        self.stopping = True

    def wind_down(self, session: Session) -> None:
        """The worker stops (SIGTERM, or retired by a reload): a handshake in progress may
        still finish, within STOP_GRACE_S, and the session is then turned away with 421
        like any idle one. Cutting it at once would fail the client's handshake whenever
        a reload retires the worker that accepted it, with no reply to tell why."""
        self.stopping = True
        loop = self.loop
        loop.timers.set_deadline(session, min(session.deadline, loop.now + STOP_GRACE_S))

    def forget(self, session: Session) -> None:
        """The session closes: stop watching its connection."""
        handshake = session.handshake
        if handshake is not None:
            self._watch(handshake, 0)
            session.handshake = None

    def _failed(self, session: Session, reason: str) -> None:
        self.stats.count_handshake_failure(reason)
        log.info("TLS handshake failed: peer=%s listener=%s reason=%s", session.peer.address,
                 session.profile.name, reason)
        self.loop.close(session, f"TLS handshake failed: {reason}")

    def _watch(self, handshake: Handshake, mask: int) -> None:
        if handshake.mask == mask:
            return
        fd = handshake.session.fd
        if not mask:
            self.poller.unregister(fd)
        elif handshake.mask:
            self.poller.modify(fd, mask)
        else:
            self.poller.register(fd, mask, handshake)
        handshake.mask = mask
