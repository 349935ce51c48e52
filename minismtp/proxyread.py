"""The PROXY header a load balancer sends first, read in a worker's loop before the session
begins (listeners with `proxy_protocol`).

Untrusted input: the first bytes of a connection, and its peer address. A peer outside
the listener's `trusted` networks is closed at once, unread. From a trusted one, bytes are
read until `proxyproto.parse` has a whole header, fails, or `limits.proxy_timeout` passes;
nothing is sent meanwhile (no greeting: the balancer relays whatever we write to its
client, and a header that never comes means the peer is not the balancer we expect).
Every failure closes the connection without a word, with one log line and a count by
reason (`stats.PROXY_FAILURES`).

The header is consumed exactly, and nothing past it: each read first peeks at the socket
(MSG_PEEK), and only bytes the parser has ruled to be header are taken from it. Whatever
follows stays in the kernel for the next reader: the SMTP core's buffer on a plain
listener, OpenSSL on an implicit-TLS one (the header comes before the ClientHello, as
HAProxy sends it in TCP mode). `parse` answers NEED_MORE only while every byte present
can still be header (a v1 line without its LF yet, a v2 header short of its length), so
taking all peeked bytes then is exact too, and a partial header never leaves readable
bytes behind for a level-triggered poller to spin on.

The header is read first right after accept (a balancer sends it with the connection);
only one not yet whole is waited for: the connection's owner in the poller is then its
`ProxyRead`, as a `Handshake` owns it during TLS (handshake.py), and the session's
deadline is the header's. Once it is in, a PROXY command's source replaces `session.peer`, so logs,
`Received:`, fault rules and stats see the client, not the balancer; LOCAL (the
balancer's health checks) and addressless headers keep the real endpoints.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Callable

from minismtp.delivery import Peer
from minismtp.loop import READ
from minismtp.poller import Poller
from minismtp.smtp import proxyproto
from minismtp.stats import WorkerStats
from minismtp.values import ProxyProtocol

if TYPE_CHECKING:
    from minismtp.loop import Loop
    from minismtp.session import Session

log = logging.getLogger("minismtp.worker")

# A stopping worker waits this long for headers on their way: a balancer sends its header
# with the connection's first segment, so a short wait covers all but a stalled peer.
STOP_GRACE_S = 2.0

_PROXY_COMMAND = proxyproto.Command.PROXY
_MAX_KNOWN = 1024  # peer addresses whose trust is remembered
_ACCEPT = {"v1": proxyproto.Version.V1, "v2": proxyproto.Version.V2,
           "any": proxyproto.Version.ANY}


class ProxyRead:
    """The poller's owner of a connection while the rest of its PROXY header is on its way."""

    __slots__ = ("session", "accept", "data", "then", "hand_over")

    def __init__(self, session: Session, accept: proxyproto.Version, data: bytes,
                 then: Callable[[Session], None], hand_over: bool) -> None:
        self.session = session
        self.accept = accept
        self.data = data  # header bytes taken so far; never past MAX_HEADER_BYTES
        self.then = then  # what the session does next: greet, or a TLS handshake
        self.hand_over = hand_over  # `then` reads the socket as the session: keep it watched


class ProxyReads:
    def __init__(self, loop: Loop, poller: Poller, stats: WorkerStats) -> None:
        self.loop = loop
        self.poller = poller
        self.stats = stats
        self.stopping = False
        self._known: dict[tuple[str, int], bool] = {}  # see _trusted
        self._debug = log.isEnabledFor(logging.DEBUG)  # set for the worker's life

    def begin(self, session: Session, proxy: ProxyProtocol,
              then: Callable[[Session], None], timeout_s: float, *,
              hand_over: bool = False) -> None:
        """A new connection on a PROXY listener: read its header, then call `then`;
        `timeout_s`: its listener's limits.proxy_timeout.
        `hand_over`: `then` goes on reading the socket as the session itself (a plain
        listener's greeting), so a socket watched for its header stays watched for the
        session, without the two system calls of unwatching and watching again."""
        known = self._known.get((session.peer.address, id(proxy)))
        if not (known or known is None and self._trusted(session.peer.address, proxy)):
            self._failed(session, "untrusted source")
            return
        accept = _ACCEPT[proxy.version]
        # A balancer sends its header with the connection: read it before asking the
        # poller, which is then only needed (two syscalls), with a deadline, for a header
        # still on its way.
        got = self._take(session, accept, b"")
        if got is None:
            return
        if type(got) is bytes:
            session.preamble = reader = ProxyRead(session, accept, got, then, hand_over)
            loop = self.loop
            loop.timers.set_deadline(session, loop.now + timeout_s)
            self.poller.register(session.fd, READ, reader)
            return
        self._use(session, got)
        then(session)

    def _trusted(self, address: str, proxy: ProxyProtocol) -> bool:
        """proxyproto.trusted, remembered per peer address and listener: the peers of a
        PROXY listener are a few balancers, and parsing an address is the costly part."""
        if len(self._known) >= _MAX_KNOWN:
            self._known.clear()  # untrusted sources churning it: start again
        # The listener's profile keeps `proxy` alive, so its id names it.
        known = self._known[address, id(proxy)] = proxyproto.trusted(address, proxy.trusted)
        return known

    def step(self, reader: ProxyRead) -> None:
        """The connection is readable: take what belongs to the header."""
        session = reader.session
        got = self._take(session, reader.accept, reader.data)
        if got is None:
            return
        if type(got) is bytes:
            reader.data = got
            return
        if reader.hand_over:
            self.poller.hand_over(session.fd, session)  # read for the session from now on
            session.mask = READ
        else:
            self.poller.unregister(session.fd)
        session.preamble = None
        self._use(session, got)
        reader.then(session)

    def _take(self, session: Session, accept: proxyproto.Version, have: bytes
              ) -> proxyproto.ProxyHeader | bytes | None:
        """Take from the socket what belongs to the header: the header, once whole; else
        the header's bytes so far (`have` and what came after it); None when the
        connection failed and is closed."""
        sock = session.transport.sock
        try:
            peeked = sock.recv(proxyproto.MAX_HEADER_BYTES - len(have), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return have
        except OSError:
            peeked = b""
        if not peeked:
            self._failed(session, "closed mid-header")
            return None
        window = have + peeked if have else peeked
        try:
            header = proxyproto.parse(window, 0, len(window), accept)
        except proxyproto.ProxyError as exc:
            self._failed(session, exc.reason)
            return None
        # Take from the socket what is header: all of it while more is needed, else
        # exactly the rest of the header. The peeked bytes are there: this cannot block.
        whole = header is not proxyproto.NEED_MORE
        take = header.consumed - len(have) if whole else len(peeked)
        try:
            taken = sock.recv(take)
        except OSError:
            taken = b""
        if len(taken) != take:  # only a socket shut under us could do this
            self._failed(session, "closed mid-header")
            return None
        return header if whole else have + taken

    def _use(self, session: Session, header: proxyproto.ProxyHeader) -> None:
        """The header is in: a PROXY command's source becomes the session's peer."""
        self.stats.proxy_headers += 1
        source = header.source
        if source is not None and header.command is _PROXY_COMMAND:
            if self._debug:
                log.debug("proxy: peer=%s is %s:%d (v%d)", session.peer.address,
                          source[0], source[1], header.version)
            session.peer = Peer(source[0], source[1])

    def expire(self, session: Session) -> None:
        """The header's deadline passed (or the grace of a stopping worker)."""
        self._failed(session, "stopping" if self.stopping else "timeout")

    def wind_down(self, session: Session) -> None:
        """The worker stops (SIGTERM, or retired by a reload): a header on its way may
        still come, within STOP_GRACE_S, and the session then gets 421 like any idle one
        (the client behind the balancer learns to try again); one that does not come in
        time is closed as "stopping"."""
        self.stopping = True
        loop = self.loop
        loop.timers.set_deadline(session, min(session.deadline, loop.now + STOP_GRACE_S))

    def forget(self, session: Session) -> None:
        """The session closes while its header is awaited: stop watching for it."""
        if session.preamble is not None:
            self.poller.unregister(session.fd)
            session.preamble = None

    def _failed(self, session: Session, reason: str) -> None:
        self.stats.count_proxy_failure(reason)
        log.info("PROXY header refused: peer=%s reason=%s", session.peer.address, reason)
        session.end = f"no PROXY header: {reason}"
        self.loop.close(session, "")
