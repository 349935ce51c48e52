"""The PROXY header a load balancer sends first, read in a worker's loop before the session
begins (listeners with `proxy_protocol`).

Untrusted input: the first bytes of a connection, and its peer address. A peer outside
the listener's `trusted` networks is closed at once, unread. From a trusted one, bytes are
read until `proxyproto.parse` has a whole header, fails, or `limits.proxy_timeout` passes;
nothing is sent meanwhile (no greeting: the balancer relays whatever we write to its
client, and a header that never comes means the peer is not the balancer we expect).
Every failure closes the connection without a word, with one log line and a count by
reason (`stats.PROXY_FAILURES`).

The header is read at accept: a PROXY listener's socket defers accepting until a
connection's first bytes are in (TCP_DEFER_ACCEPT, listeners.py), so they are there.
On a plain listener a whole header starts the session at once, greeting and all, and
the session watches its socket as on any listener: no `ProxyRead`, no deadline of its
own. Where the header is not whole yet (a peer that sends it in pieces, a kernel
without deferral, the kernel's deferral over), and always on an implicit-TLS listener,
the connection goes to the poller, owned by its `ProxyRead` (as a `Handshake` owns one
during TLS, handshake.py), with the header's deadline as the session's. Once the header
is in, a plain listener's session takes the registration over; an implicit-TLS one
unregisters it for the handshake, which watches it its own way, two system calls a
connection. (Without the deferral, most headers in bench/'s S1E arrived after the
accept, and a read tried at once and failed cost more than the wake-up it saved.)

On a plain listener the header is read into the SMTP core's buffer, with the one read
the session would make anyway, and parsed there: the header's bytes are consumed, and
whatever came after it (a client talking before the greeting) stays in the buffer for
the core, which runs on it once the greeting is out. HAProxy's usual header (its
send-proxy-v2 for an IPv4 client) alone in that read, the common case by far, is taken
in one step (`proxyproto.haproxy_tcp4_source`): no ProxyHeader is made and the buffer is
left empty (13k instructions a connection in bench/'s S1E, against 21k the general way).
On an implicit-TLS listener what follows the header belongs to OpenSSL, which reads the
socket itself (the header comes before the ClientHello, as HAProxy sends it in TCP mode):
there each read first peeks (MSG_PEEK), and only bytes the parser has ruled to be
header are taken. `parse` answers NEED_MORE only while every byte present can still be
header (a v1 line without its LF yet, a v2 header short of its length), so taking all
peeked bytes then is exact too, and a partial header never leaves readable bytes behind
for a level-triggered poller to spin on.

Once the header is in, a PROXY command's source replaces `session.peer`, so logs,
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
_NEED_MORE = proxyproto.NEED_MORE
_V1_ONLY = proxyproto.Version.V1
_TCP4_BYTES = proxyproto.TCP4_BYTES
_haproxy_tcp4_source = proxyproto.haproxy_tcp4_source
_new_peer = tuple.__new__  # a Peer without the named tuple's __new__ (a Python call)
_MAX_KNOWN = 1024  # peer addresses whose trust is remembered
# Listening sockets defer accepting here (listeners.py): a new connection's header is in.
_READ_AT_ACCEPT = hasattr(socket, "TCP_DEFER_ACCEPT")
_ACCEPT = {"v1": proxyproto.Version.V1, "v2": proxyproto.Version.V2,
           "any": proxyproto.Version.ANY}


class ProxyRead:
    """The poller's owner of a connection while the rest of its PROXY header is on its way."""

    __slots__ = ("session", "accept", "data", "then", "hand_over")

    def __init__(self, session: Session, accept: proxyproto.Version, data: bytes,
                 then: Callable[[Session], None], hand_over: bool) -> None:
        self.session = session
        self.accept = accept
        self.data = data  # implicit TLS: header bytes taken so far, at most MAX_HEADER_BYTES
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
        """A new connection on a PROXY listener: wait for its header, then call `then`;
        `timeout_s`: its listener's limits.proxy_timeout.
        `hand_over`: a plain listener, where `then` greets and the session goes on
        reading the socket itself: the header is read into the core's buffer, and the
        socket stays watched for the session, without unwatching and watching again."""
        known = self._known.get((session.peer.address, id(proxy)))
        if not (known or known is None and self._trusted(session.peer.address, proxy)):
            self._failed(session, "untrusted source")
            return
        accept = _ACCEPT[proxy.version]
        if hand_over and _READ_AT_ACCEPT:
            # Most often the whole header is in: the session starts at once, and watches
            # its socket itself, as on a listener without PROXY.
            buffer = session.conn.buffer  # a new session's: empty
            n = self._recv_into_core(session)
            if not n:
                return  # failed, and closed
            if n == _TCP4_BYTES and accept is not _V1_ONLY:
                # HAProxy's usual header, and nothing after it: the usual case, in one
                # step (no ProxyHeader, and the buffer left empty).
                source = _haproxy_tcp4_source(buffer.data, n)
                if source is not None:
                    buffer.end = 0
                    self.stats.proxy_headers += 1
                    if self._debug:
                        log.debug("proxy: peer=%s is %s:%d (v2)", session.peer.address,
                                  source[0], source[1])
                    session.peer = _new_peer(Peer, source)
                    then(session)
                    return
            header = self._parsed(session, accept) if n > 0 else _NEED_MORE
            if header is None:
                return  # failed, and closed
            if header is not _NEED_MORE:
                self._start_plain(session, header, then)
                return
        session.preamble = reader = ProxyRead(session, accept, b"", then, hand_over)
        loop = self.loop
        loop.timers.set_deadline(session, loop.now + timeout_s)
        self.poller.register(session.fd, READ, reader)
        if _READ_AT_ACCEPT and not hand_over:
            self.step(reader)  # most often the whole header, and the handshake begins

    def _trusted(self, address: str, proxy: ProxyProtocol) -> bool:
        """proxyproto.trusted, remembered per peer address and listener: the peers of a
        PROXY listener are a few balancers, and parsing an address is the costly part."""
        if len(self._known) >= _MAX_KNOWN:
            self._known.clear()  # untrusted sources churning it: start again
        # The listener's profile keeps `proxy` alive, so its id names it.
        known = self._known[address, id(proxy)] = proxyproto.trusted(address, proxy.trusted)
        return known

    def step(self, reader: ProxyRead) -> None:
        """The connection is readable: read the header, or what has come of it. On a
        plain listener the read may also take what the client sent after the header."""
        if not reader.hand_over:
            self._step_implicit_tls(reader)
            return
        # A plain listener: read into the core's buffer, consume the header once whole.
        session = reader.session
        header = self._read_into_core(session, reader.accept)
        if header is None or header is _NEED_MORE:
            return
        self.poller.hand_over(session.fd, session)  # read for the session from now on
        session.mask = READ
        self._start_plain(session, header, reader.then)

    def _read_into_core(self, session: Session, accept: proxyproto.Version
                        ) -> proxyproto.ProxyHeader | proxyproto.NeedMore | None:
        """A plain listener's read, into the core's buffer: the whole header, NEED_MORE,
        or None when the connection failed (and is closed)."""
        n = self._recv_into_core(session)
        if not n:
            return None
        return self._parsed(session, accept) if n > 0 else _NEED_MORE

    def _recv_into_core(self, session: Session) -> int:
        """Read into the core's buffer: how many bytes came, -1 when none were there
        yet, 0 when the peer closed or failed (and the connection is closed)."""
        buffer = session.conn.buffer
        try:
            n = session.transport.sock.recv_into(buffer.free_view())
        except (BlockingIOError, InterruptedError):
            return -1
        except OSError:
            n = 0
        if not n:
            self._failed(session, "closed mid-header")
            return 0
        buffer.end += n
        return n

    def _parsed(self, session: Session, accept: proxyproto.Version
                ) -> proxyproto.ProxyHeader | proxyproto.NeedMore | None:
        """The core's buffer parsed: the whole header, NEED_MORE, or None when it cannot
        be one (and the connection is closed)."""
        buffer = session.conn.buffer
        try:
            return proxyproto.parse(buffer.data, buffer.start, buffer.end, accept)
        except proxyproto.ProxyError as exc:
            self._failed(session, exc.reason)
            return None

    def _start_plain(self, session: Session, header: proxyproto.ProxyHeader,
                     then: Callable[[Session], None]) -> None:
        """The whole header is in the core's buffer: consume it, and begin the session."""
        buffer = session.conn.buffer
        buffer.start += header.consumed
        early = buffer.end - buffer.start  # the client spoke before the greeting
        self.stats.bytes_received += early  # counted as the session's reads count theirs
        session.preamble = None
        self._use(session, header)
        then(session)
        # Run the core on what came early, once the greeting is out or on its way; a
        # greeting sent slowly (a connect tarpit) resumes the session when it is done.
        if early and not session.trickling:
            self.loop.resume(session)

    def _step_implicit_tls(self, reader: ProxyRead) -> None:
        session = reader.session
        header = self._take(session, reader)
        if header is not None:
            session.preamble = None
            self._use(session, header)
            self.poller.unregister(session.fd)
            reader.then(session)

    def _take(self, session: Session, reader: ProxyRead) -> proxyproto.ProxyHeader | None:
        """An implicit-TLS listener's read: take from the socket what belongs to the
        header, and nothing past it; None while it is not whole (its bytes so far in
        `reader.data`), or when the connection failed and is closed."""
        sock = session.transport.sock
        have = reader.data
        try:
            peeked = sock.recv(proxyproto.MAX_HEADER_BYTES - len(have), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            peeked = b""
        if not peeked:
            self._failed(session, "closed mid-header")
            return None
        window = have + peeked if have else peeked
        try:
            header = proxyproto.parse(window, 0, len(window), reader.accept)
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
        if not whole:
            reader.data = have + taken
            return None
        return header

    def _use(self, session: Session, header: proxyproto.ProxyHeader) -> None:
        """The header is in: a PROXY command's source becomes the session's peer."""
        self.stats.proxy_headers += 1
        source = header.source
        if source is not None and header.command is _PROXY_COMMAND:
            if self._debug:
                log.debug("proxy: peer=%s is %s:%d (v%d)", session.peer.address,
                          source[0], source[1], header.version)
            session.peer = _new_peer(Peer, source)  # (address, port): Peer's own fields

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
        log.info("PROXY header refused: peer=%s listener=%s reason=%s", session.peer.address,
                 session.profile.name, reason)
        session.end = f"no PROXY header: {reason}"
        self.loop.close(session, "")
