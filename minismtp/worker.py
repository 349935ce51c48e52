"""A worker process: one `selectors` loop gluing sockets, the protocol core and delivery.

Untrusted input: client connections (bytes, timing, half-closed sockets). Every session
has a deadline (command idle time, whole-DATA time, minimum DATA rate), output is
written only when the socket is writable and reading stops while output is pending, so a
client that never reads cannot make us buffer without bound.
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
import selectors
import signal
import socket
import time

from minismtp import exitcodes, replies
from minismtp.config import Config
from minismtp.delivery import Backend, DeliveryError, Peer, Sink
from minismtp.delivery.group import GroupCommitter
from minismtp.events import (
    NEED_DATA, PAUSED, BodyChunk, ConnectionClosed, DataStarted, Envelope, Hello, MailFrom,
    MessageEnd, MessageRejected, Quit, RcptTo, Reset,
)
from minismtp.heartbeat import HeartbeatBoard
from minismtp.protocol import Settings, SmtpServerConnection, State

log = logging.getLogger("minismtp.worker")

_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
_ACCEPTS_PER_WAKEUP = 64  # drain the accept queue, but let established clients run too
_RATE_GRACE_S = 5.0  # DATA may start slowly before min_data_rate applies
_TICK_S = 1.0  # heartbeat, parent check and shutdown checks at least this often
_LINGER_S = 2.0  # after a last reply, how long unread client bytes are drained
_ACCEPT_PAUSE_S = 0.5  # out of file descriptors: let the queue wait instead of spinning
_LISTENER, _WAKEUP, _COMMITS = object(), object(), object()


def protocol_settings(config: Config) -> Settings:
    limits = config.limits
    return Settings(
        hostname=config.server.hostname,
        max_message_bytes=limits.max_message_size,
        max_recipients=limits.max_recipients,
        max_command_bytes=limits.max_command_length,
        max_errors=limits.max_errors,
        reject_bare_lf=limits.bare_lf == "reject",
        command_buffer_bytes=max(4096, 2 * limits.max_command_length),
    )


class Session:
    """One client connection: socket, protocol state, message in progress, timers."""

    __slots__ = (
        "sock", "conn", "peer", "sink", "sink_failed", "out", "mask", "deadline",
        "timer_at", "data_started", "data_bytes", "envelope", "paused", "lingering", "closed",
    )

    def __init__(self, sock: socket.socket, conn: SmtpServerConnection, peer: Peer) -> None:
        self.sock = sock
        self.conn = conn
        self.peer = peer
        self.sink: Sink | None = None
        self.sink_failed = False
        self.out = b""  # reply bytes the socket did not take yet
        self.mask = 0
        self.deadline = 0.0
        self.timer_at = float("inf")  # earliest live heap entry for this session
        self.data_started = 0.0
        self.data_bytes = 0
        self.envelope: Envelope | None = None  # of the message in DATA, for the log line
        self.paused = False  # a decision is deferred (commit in progress): do not read
        self.lingering = False  # last reply sent, write side shut: draining until EOF
        self.closed = False


class Worker:
    def __init__(
        self, config: Config, listeners: list[socket.socket], backend: Backend,
        board: HeartbeatBoard, slot: int,
    ) -> None:
        self.config = config
        self.listeners = listeners
        self.backend = backend
        self.board = board
        self.slot = slot
        self.settings = protocol_settings(config)
        self.sessions: dict[int, Session] = {}
        self.timers: list[tuple[float, int, Session]] = []
        self._timer_seq = 0
        self.stopping = False
        self.stop_deadline = float("inf")
        self.parent = os.getppid()
        self.sel = selectors.DefaultSelector()  # our own: an inherited epoll is shared state
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self.accept_paused_until = 0.0
        self.committer: GroupCommitter[tuple[Session, int]] | None = (
            GroupCommitter(backend) if backend.commit_blocks else None)
        self._handlers = {
            Hello: self._on_hello, MailFrom: self._on_simple, RcptTo: self._on_simple,
            Quit: self._on_simple, DataStarted: self._on_data, MessageEnd: self._on_end,
            MessageRejected: self._on_rejected, Reset: self._on_reset,
        }

    # -- set-up and main loop ------------------------------------------------------

    def _init_signals(self) -> None:
        # Handlers do nothing: the wakeup fd carries the signal number into the loop.
        # No logging or other work in a handler (a lock taken there can deadlock).
        for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL if sig == signal.SIGCHLD else signal.SIG_IGN)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, _ignore_signal)
        for sock in (self._wakeup_r, self._wakeup_w):
            sock.setblocking(False)
        signal.set_wakeup_fd(self._wakeup_w.fileno(), warn_on_full_buffer=False)
        self.sel.register(self._wakeup_r, _READ, _WAKEUP)

    def run(self) -> int:
        self._init_signals()
        for listener in self.listeners:
            self.sel.register(listener, _READ, _LISTENER)
        if self.committer is not None:
            self.sel.register(self.committer.wakeup, _READ, _COMMITS)
        log.debug("worker %d serving", os.getpid())
        last_tick = 0.0
        try:
            while not (self.stopping and not self.sessions):
                now = time.monotonic()
                if now - last_tick >= _TICK_S:
                    last_tick = now
                    if not self._tick(now):
                        break
                for key, mask in self.sel.select(self._select_timeout(now)):
                    data = key.data
                    if data is _LISTENER:
                        self._accept(key.fileobj)
                    elif data is _COMMITS:
                        self._on_commits()
                    elif data is _WAKEUP:
                        self._read_signals()
                    else:
                        if mask & _WRITE:
                            self._on_writable(data)
                        if mask & _READ and not data.closed:
                            self._on_readable(data)
                self._expire(time.monotonic())
        finally:
            for session in list(self.sessions.values()):
                self._close(session, "worker exit")
            if self.committer is not None:
                self.committer.stop()
            self.backend.close()
        return exitcodes.OK

    def _tick(self, now: float) -> bool:
        self.board.beat(self.slot, now)
        if self.accept_paused_until and now >= self.accept_paused_until:
            self.accept_paused_until = 0.0
            for listener in self.listeners:
                self.sel.register(listener, _READ, _LISTENER)
        if os.getppid() != self.parent:
            log.warning("worker %d: master went away, exiting", os.getpid())
            self._begin_stop(now)
        return now < self.stop_deadline

    def _select_timeout(self, now: float) -> float:
        timeout = _TICK_S
        if self.timers:
            timeout = min(timeout, max(0.0, self.timers[0][0] - now))
        return timeout

    def _read_signals(self) -> None:
        try:
            signums = self._wakeup_r.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        for signum in signums:
            if signum == signal.SIGQUIT:
                self.stop_deadline = 0.0  # immediate: the loop ends at the next tick
                raise SystemExit(exitcodes.OK)
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._begin_stop(time.monotonic())

    def _begin_stop(self, now: float) -> None:
        """Stop accepting; close idle sessions; let transactions in flight finish."""
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = now + self.config.server.shutdown_timeout
        for listener in self.listeners:
            if not self.accept_paused_until:
                self.sel.unregister(listener)
            listener.close()
        self.listeners = []
        self.accept_paused_until = 0.0
        for session in list(self.sessions.values()):
            if not session.conn.in_transaction:
                session.conn.shutdown(replies.SHUTTING_DOWN)
                self._flush(session)

    # -- connections ---------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(_ACCEPTS_PER_WAKEUP):
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return  # another worker won the race, or the queue is empty
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept: %s; pausing accepts", exc.strerror)
                    self._pause_accepting()
                    return
                raise
            self._start_session(sock, addr)

    def _pause_accepting(self) -> None:
        if not self.accept_paused_until:
            self.accept_paused_until = time.monotonic() + _ACCEPT_PAUSE_S
            for listener in self.listeners:
                self.sel.unregister(listener)

    def _start_session(self, sock: socket.socket, addr: tuple) -> None:
        sock.setblocking(False)
        if len(self.sessions) >= self.config.server.max_connections:
            try:
                sock.send(replies.TOO_MANY_CONNECTIONS.wire)
            except OSError:
                pass
            sock.close()
            return
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # we batch replies
        session = Session(sock, SmtpServerConnection(self.settings), Peer(addr[0], addr[1]))
        self.sessions[sock.fileno()] = session
        self._set_deadline(session, time.monotonic() + self.config.limits.command_timeout)
        session.conn.greet()
        self._flush(session)

    def _on_readable(self, session: Session) -> None:
        if session.lingering:
            self._drain(session)
            return
        conn = session.conn
        try:
            n = session.sock.recv_into(conn.buffer.free_view())
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(session, f"read error: {exc.strerror}")
            return
        if n == 0:
            self._close(session, "client closed the connection")
            return
        conn.buffer.commit(n)
        if conn.state is State.DATA:
            session.data_bytes += n
            self._set_data_deadline(session, time.monotonic())
        self._drive(session)

    def _on_writable(self, session: Session) -> None:
        self._flush(session)

    def _drive(self, session: Session) -> None:
        """Run the core until it wants more bytes or an answer; act on each event."""
        conn = session.conn
        handlers = self._handlers
        while True:
            event = conn.next_event()
            kind = type(event)
            if kind is BodyChunk:
                if session.sink is not None:
                    try:
                        session.sink.write(event.data)
                    except DeliveryError as exc:
                        self._sink_failed(session, exc)
                continue
            if event is NEED_DATA or event is PAUSED or kind is ConnectionClosed:
                break
            handlers[kind](session, event)
            self._maybe_send_off(conn)  # before any pipelined command that follows
        self._maybe_send_off(conn)  # also when the answer came from a deferred commit
        self._flush(session)

    def _maybe_send_off(self, conn: SmtpServerConnection) -> None:
        """While stopping, a session whose transaction is over gets 421 and is closed."""
        if self.stopping and not conn.in_transaction and not conn.closed:
            conn.shutdown(replies.SHUTTING_DOWN)

    # -- events --------------------------------------------------------------------

    def _on_simple(self, session: Session, event: object) -> None:
        session.conn.accept()

    def _on_hello(self, session: Session, event: Hello) -> None:
        session.conn.accept()

    def _on_reset(self, session: Session, event: Reset) -> None:
        pass

    def _on_data(self, session: Session, event: DataStarted) -> None:
        try:
            session.sink = self.backend.open(event.envelope, session.peer)
        except DeliveryError as exc:
            log.error("cannot store message from %s: %s", session.peer.address, exc)
            session.conn.reject(replies.LOCAL_ERROR)
            return
        session.sink_failed = False
        session.data_bytes = len(session.conn.buffer)
        session.data_started = now = time.monotonic()
        session.conn.accept()
        self._set_data_deadline(session, now)
        session.envelope = event.envelope

    def _on_end(self, session: Session, event: MessageEnd) -> None:
        sink, session.sink = session.sink, None
        if sink is None or session.sink_failed:
            self._answer_end(session, event.size, DeliveryError("write failed"))
        elif self.committer is not None:
            session.paused = True  # the reply waits for the disk; other clients do not
            self._set_deadline(session, time.monotonic() + self.config.limits.command_timeout)
            self.committer.submit((session, event.size), sink)
        else:
            try:
                result: str | DeliveryError = sink.commit()
            except DeliveryError as exc:
                result = exc
            self._answer_end(session, event.size, result)

    def _on_commits(self) -> None:
        for (session, size), result in self.committer.take_done():
            if session.closed:
                if isinstance(result, str):
                    log.info("id=%s stored, but the client left before the reply", result)
                continue
            session.paused = False
            self._answer_end(session, size, result)
            self._drive(session)  # pipelined commands may be waiting behind the reply

    def _answer_end(self, session: Session, size: int, result: str | DeliveryError) -> None:
        if isinstance(result, str):
            session.conn.accept(result)
            self._log_transaction(session, session.envelope, size, "250 queued", result)
        else:
            log.error("cannot store message from %s: %s", session.peer.address, result)
            session.conn.reject(replies.LOCAL_ERROR)
            self._log_transaction(session, session.envelope, size, "451 local error", "-")
        self._set_deadline(session, time.monotonic() + self.config.limits.command_timeout)

    def _on_rejected(self, session: Session, event: MessageRejected) -> None:
        sink, session.sink = session.sink, None
        if sink is not None:
            sink.abort()
        self._log_transaction(session, session.envelope, event.size, f"rejected: {event.reason}", "-")
        self._set_deadline(session, time.monotonic() + self.config.limits.command_timeout)

    def _sink_failed(self, session: Session, exc: DeliveryError) -> None:
        log.error("write failed for message from %s: %s", session.peer.address, exc)
        session.sink_failed = True
        sink, session.sink = session.sink, None
        if sink is not None:
            sink.abort()  # keep reading to the terminator, then answer 451

    def _log_transaction(self, session, envelope, size: int, result: str, queue_id: str) -> None:
        if log.isEnabledFor(logging.INFO):
            log.info("id=%s peer=%s from=<%s> rcpts=%d size=%d result=%s", queue_id,
                     session.peer.address, envelope.sender, len(envelope.recipients), size,
                     result)

    # -- output, timers, close -----------------------------------------------------

    def _flush(self, session: Session) -> None:
        if session.closed:
            return
        data = session.conn.data_to_send()
        if data:
            session.out = session.out + data if session.out else data
            if session.conn.state is not State.DATA:
                # A reply means a command completed: the idle clock starts again.
                self._set_deadline(session, time.monotonic() + self.config.limits.command_timeout)
        if session.out:
            try:
                sent = session.sock.send(session.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._close(session, f"write error: {exc.strerror}")
                return
            session.out = session.out[sent:] if sent < len(session.out) else b""
        if session.out:
            self._want(session, _WRITE)  # stop reading until the client takes our replies
        elif session.conn.closed:
            self._linger(session)
        else:
            self._want(session, 0 if session.paused else _READ)

    def _want(self, session: Session, mask: int) -> None:
        """Select on `mask` (0: not at all), with a syscall only when it changes."""
        if session.mask == mask:
            return
        if not mask:
            self.sel.unregister(session.sock)
        elif session.mask:
            self.sel.modify(session.sock, mask, session)
        else:
            self.sel.register(session.sock, mask, session)
        session.mask = mask

    def _set_deadline(self, session: Session, deadline: float) -> None:
        session.deadline = deadline
        if deadline < session.timer_at:
            self._timer_seq += 1
            heapq.heappush(self.timers, (deadline, self._timer_seq, session))
            session.timer_at = deadline

    def _set_data_deadline(self, session: Session, now: float) -> None:
        limits = self.config.limits
        deadline = min(now + limits.command_timeout, session.data_started + limits.data_timeout)
        if limits.min_data_rate:
            # By time t the client must have sent min_data_rate * (t - start - grace) bytes.
            deadline = min(deadline, session.data_started + _RATE_GRACE_S
                           + session.data_bytes / limits.min_data_rate)
        self._set_deadline(session, deadline)

    def _expire(self, now: float) -> None:
        timers = self.timers
        while timers and timers[0][0] <= now:
            when, _, session = heapq.heappop(timers)
            if session.closed or when != session.timer_at:
                continue  # superseded by an earlier entry, or the session is gone
            session.timer_at = float("inf")
            if session.deadline > now:
                self._set_deadline(session, session.deadline)
                continue
            if session.lingering:
                self._close(session, "")
                continue
            log.info("timeout: peer=%s state=%s", session.peer.address, session.conn.state.value)
            self._abort_message(session)
            session.conn.shutdown(replies.TIMEOUT)
            self._flush(session)
            if not (session.closed or session.lingering):
                self._close(session, "timeout")  # it is not reading: do not wait for it

    def _linger(self, session: Session) -> None:
        """Close after a last reply without letting a reset destroy it.

        Closing a socket that still has unread client bytes (pipelined commands after a
        421, say) sends RST, and the client's kernel may then drop our reply before the
        client reads it. So shut our side, read and discard until the client closes or
        _LINGER_S passes, then close (the "lingering close" of HTTP servers). After QUIT
        the client has nothing more to say: close at once.
        """
        if session.conn.close_reason == "quit" and not len(session.conn.buffer):
            self._close(session, "")
            return
        try:
            session.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(session, "")
            return
        session.lingering = True
        self._want(session, _READ)
        self._set_deadline(session, time.monotonic() + _LINGER_S)

    def _drain(self, session: Session) -> None:
        try:
            for _ in range(16):  # bounded: a flooding client must not hold the loop
                if not session.sock.recv(65536):
                    break
            else:
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._close(session, "")

    def _abort_message(self, session: Session) -> None:
        sink, session.sink = session.sink, None
        if sink is not None:
            sink.abort()

    def _close(self, session: Session, reason: str) -> None:
        if session.closed:
            return
        session.closed = True
        self._abort_message(session)
        if session.mask:
            self.sel.unregister(session.sock)
        self.sessions.pop(session.sock.fileno(), None)
        session.sock.close()
        if reason:
            log.debug("closed %s: %s", session.peer.address, reason)


def _ignore_signal(signum: int, frame: object) -> None:
    """Nothing here: the wakeup fd tells the loop (see Worker._init_signals)."""
