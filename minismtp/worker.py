"""A worker process: one event loop gluing transports, the protocol core and delivery.

Untrusted input: client connections (bytes, timing, half-closed sockets). Every session
has a deadline (command idle time, whole-DATA time, minimum DATA rate), output is
written only when the socket is writable and reading stops while output is pending, so a
client that never reads cannot make us buffer without bound. A turn of the loop takes
in a bounded amount of body over all sessions (`turn.py`), so that bodies that are dear
to take in (bare LFs to rewrite) delay the others, and the heartbeat, a bounded time.

This module is the loop: readiness -> transport -> core -> events, and the clock. The
rest has a home of its own: which connections to take (`acceptor.py`), replies going out
and the tarpit (`output.py`), answers to decision events (`decisions.py`), a message's
sink (`storage.py`), socket I/O (`transport.py`). They see the loop only through
`loop.Loop`, which this class implements.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Iterable

from minismtp import exitcodes
from minismtp.acceptor import Accepted, Acceptor, Listening
from minismtp.anvil import ClientTable
from minismtp.clientlimits import ClientGate
from minismtp.config import Config
from minismtp.decisions import Decisions
from minismtp.delivery import Backend, Peer
from minismtp.faults import FaultInjector, FaultsConfig
from minismtp.handshake import Handshake, Handshakes
from minismtp.heartbeat import HeartbeatBoard
from minismtp.logboard import LogBoard
from minismtp.logins import Logins
from minismtp.loop import READ, WRITE
from minismtp.msglog import MessageLog
from minismtp.output import LINGER_S, Output
from minismtp.poller import Poller
from minismtp.proxyread import ProxyRead, ProxyReads
from minismtp.profiles import effective_faults
from minismtp.session import Profile, Session
from minismtp.signals import MASTER_SIGNALS, SignalWakeup
from minismtp.smtp import replies
from minismtp.smtp.events import NEED_DATA, PAUSED, BodyChunk, ConnectionClosed
from minismtp.smtp.protocol import SmtpServerConnection, State
from minismtp.stats import StatsBoard, WorkerStats
from minismtp.storage import Storage
from minismtp.timers import Timers
from minismtp.transport import PlainTransport
from minismtp.turn import BODY_BYTES as _TURN_BODY_BYTES
from minismtp.turn import Turn
from minismtp.values import Listener

log = logging.getLogger("minismtp.worker")

_TICK_S = 1.0  # heartbeat, counters, parent check and shutdown checks this often
# A commit takes milliseconds: one this long means the disk has stopped answering (an
# NFS server gone, a failing device); said this often while it lasts.
_COMMIT_STALL_S = 10.0
# At most, while a body streams in (8 full reads of the 256 KiB buffer, or 128 TLS
# records): other clients wait meanwhile.
_READ_BYTES_PER_WAKEUP = 2 * 1024 * 1024
_GC_THRESHOLD = 10_000  # tracked allocations (net of frees) between young collections
_WAKEUP, _COMMITS, _LOGINS = object(), object(), object()
_DATA, _AUTH = State.DATA, State.AUTH  # globals: Enum class attributes are slow to read


class Worker:
    def __init__(
        self, config: Config, listeners: list[tuple[socket.socket, Listener]],
        backend: Backend, board: HeartbeatBoard, slot: int, stats_board: StatsBoard,
        signal_mask: Iterable[int] = (), tls_context: ssl.SSLContext | None = None,
        clients: ClientTable | None = None, log_board: LogBoard | None = None,
        index: int = 0,
    ) -> None:
        self.config = config
        self.signal_mask = signal_mask  # restored once our own handlers are in place
        self.board = board
        self.slot = slot
        self.stats_board = stats_board
        # Per listening socket: what its listener's sessions share (session.Profile), the
        # listener's overrides merged with the top-level settings here, once. One profile
        # per listener entry, however many of its sockets this worker has (reuse_port);
        # by the entry itself, not its name: repeats of a port-0 address share a derived
        # name, each with overrides of its own (entries alike share a profile alike).
        names = [listener.name for listener in config.server.listen]
        self.stats = WorkerStats(stats_board.max_rules, len(names))
        by_entry: dict[Listener, Profile] = {}
        for _, entry in listeners:
            if entry not in by_entry:
                by_entry[entry] = Profile(config, entry,
                                          self.stats.listeners[names.index(entry.name)],
                                          tls=tls_context is not None)
        self.profiles = {sock: by_entry[entry] for sock, entry in listeners}
        self.max_connections = config.server.max_connections
        # The loop's clock, read when select() returns and again before timers run:
        # deadlines are whole seconds, and every command would otherwise read it 2-3 times.
        self.now = time.monotonic()
        self.sessions: dict[int, Session] = {}
        self.turn = Turn(_in_body)  # this turn's events and body bytes (turn.py)
        self.timers = Timers()
        self.stopping = False
        self.stop_deadline = float("inf")
        self.cut_off = False  # shutdown_timeout ran out: last replies sent, lingering
        self.stall_logged_at = float("-inf")  # when a stalled commit was last logged
        self.parent = os.getppid()
        self.poller = Poller()  # our own: an inherited epoll is shared state
        self.wakeup = SignalWakeup()
        # With reuse_port the queue is this worker's own; otherwise it shares it fairly.
        self.acceptor = Acceptor(self.poller, [sock for sock, _ in listeners], board, slot, not config.server.reuse_port,
                                 self.sessions, self._read_pending_signals,
                                 self.max_connections)
        self.storage = Storage(backend)
        self.output = Output(self)
        self.flush = self.output.flush  # bound once: called for every batch of replies
        # The log lines' slot in shared memory: the master writes what it holds if we die.
        self.msglog = MessageLog(log, slot=None if log_board is None else log_board.slot(slot))
        # limits.per_client: None when no limit is set, and then no session pays for it.
        per_client = config.limits.per_client
        self.gate = ClientGate(per_client, clients, slot, self, self.stats,
                               config.server.hostname) \
            if per_client.enabled and clients is not None else None
        self.logins = Logins.maybe(self, self.stats, [  # AUTH checks, if a listener offers it
            (self.profiles[sock].settings, entry.auth) for sock, entry in listeners])
        # A seeded fault sequence is the worker's place in its generation's: the same
        # after a reload or a respawn, whichever board slot the worker was given.
        self.decide = self._decisions(config.faults, index)
        for _, entry in listeners:  # a listener's own faults keys replace the top-level ones
            profile = by_entry[entry]
            if profile.decide is None:
                decide = self._decisions(effective_faults(config.faults, entry), index) \
                    if entry.faults else self.decide
                profile.decide, profile.handlers = decide, decide.handlers
        self.handshakes = None if tls_context is None else Handshakes(
            self, self.poller, tls_context, self.stats, self._greet)
        self.proxies = ProxyReads(self, self.poller, self.stats)

    def _decisions(self, faults: FaultsConfig, stream: int) -> Decisions:
        return Decisions(self, self.storage, FaultInjector(faults, stream), self.stats,
                         self.msglog, self.logins, self.gate)

    # -- set-up and main loop ------------------------------------------------------

    def _init_signals(self) -> None:
        for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1,
                    signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)  # the master's business (USR1: logrotate's)
        self.wakeup.install((signal.SIGTERM, signal.SIGINT, signal.SIGQUIT))
        self.poller.register(self.wakeup.sock.fileno(), READ, _WAKEUP)
        # The master forks us with its signals blocked (arbiter.py): what arrived since
        # is delivered now, to our own handlers. Unblocked whatever mask the master had
        # then: a signal left blocked here would never reach us.
        signal.pthread_sigmask(signal.SIG_SETMASK, self.signal_mask)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)

    def run(self) -> int:
        # Everything alive now (modules, config) lives as long as the process: keep it out
        # of the collector's full passes, which would otherwise walk it again and again as
        # sessions come and go (and, after a fork, touch pages shared with the master).
        gc.freeze()
        # Closed sessions wait in the timer heap until it is pruned (timers.py), which
        # the collector sees as growth: at the default threshold (700) it ran every few
        # dozen connections, to find nothing. Cycles are rare here; collect less often.
        gc.set_threshold(_GC_THRESHOLD, *gc.get_threshold()[1:])
        batch = self.config.server.sched_batch
        if batch is None:  # auto: not where replies wait for the disk (etc/minismtp.yaml)
            batch = self.storage.wakeup is None
        if batch:
            _batch_scheduling()
        self._init_signals()
        acceptor = self.acceptor
        acceptor.open_queues(self.config.server.backlog)  # last: set up, we accept
        acceptor.refresh()
        if self.storage.wakeup is not None:
            self.poller.register(self.storage.wakeup.fileno(), READ, _COMMITS)
        if self.logins is not None:
            self.poller.register(self.logins.wakeup.fileno(), READ, _LOGINS)
        flush, on_readable, start = self.flush, self._on_readable, self._start_sessions
        msglog = self.msglog
        gate = self.gate
        turn = self.turn
        pending = None if gate is None else gate.table.pending  # counts not yet shared
        last_tick = 0.0
        self.now = now = time.monotonic()
        try:
            while not (self.stopping and not self.sessions):
                if now - last_tick >= _TICK_S:
                    last_tick = now
                    if not self._tick(now):
                        break
                if now >= msglog.due:
                    msglog.flush()  # log lines held HOLD_S in shared memory (logboard.py)
                events = self.poller.poll(self._select_timeout(now))
                self.now = time.monotonic()
                if turn.cut:  # the last turn ended early: the least recently read first
                    events = turn.least_read_first(events)
                turn.body_bytes = 0
                turn.events = ready = iter(events)
                for owner, mask in ready:  # turn.end() ends it early
                    kind = owner.__class__
                    if kind is Session:
                        if mask & WRITE:
                            flush(owner)
                        if mask & READ and not owner.closed:
                            on_readable(owner)
                    elif kind is Listening:
                        start(acceptor.on_readable(owner.sock, self.now))
                    elif kind is Handshake:
                        self.handshakes.step(owner)
                    elif kind is ProxyRead:
                        self.proxies.step(owner)
                    elif owner is _COMMITS:
                        self.decide.on_commits()
                    elif owner is _WAKEUP:
                        self.read_signals()
                    elif owner is _LOGINS:
                        self.logins.on_done()
                self.now = now = time.monotonic()
                self.timers.expire(now, self._on_deadline)
                if acceptor.deferred_until and now >= acceptor.deferred_until:
                    start(acceptor.end_deferral())
                if pending and now >= gate.flush_at:
                    gate.flush()  # per-client counts: shared within FLUSH_S
        finally:
            self.stopping = True
            acceptor.close()  # not accepting, whatever ended the loop
            self._answer_commits_in_flight()
            for session in list(self.sessions.values()):
                self.close(session, "worker exit")
            self.storage.close()
            if self.logins is not None:
                self.logins.stop()
            if self.gate is not None:
                self.gate.table.flush(time.monotonic(), wait=True)
            self._publish_stats()
            self.msglog.close()
        return exitcodes.OK

    def _tick(self, now: float) -> bool:
        self.board.beat(self.slot, now)
        stalled = self.storage.stalled_for(now)
        if stalled >= _COMMIT_STALL_S and now - self.stall_logged_at >= _COMMIT_STALL_S:
            self.stall_logged_at = now
            log.error("delivery: a commit has waited %.0fs for the disk; the messages "
                      "behind it wait with it", stalled)
        self._publish_stats()
        self._trim_buffers()
        if self.msglog.behind:  # records of other threads, held for a stalled stream
            self.msglog.flush()
        self.acceptor.tick(now)
        if os.getppid() != self.parent and not self.stopping:
            log.warning("worker %d: master went away, exiting", os.getpid())
            self._begin_stop(now)
        if now < self.stop_deadline:
            return True
        if self.cut_off:
            return False  # the last replies had their time to be read
        self._cut_off(now)
        return True

    def _cut_off(self, now: float) -> None:
        """shutdown_timeout is up: the sessions still in a transaction are closed, each
        with a 421 and a lingering close (output.py), so that the client reads why
        instead of meeting a reset. The loop runs on for them, LINGER_S at most."""
        self.cut_off = True
        self.stop_deadline = now + LINGER_S
        self._answer_commits_in_flight()  # their 250 or 451/452 first
        for session in list(self.sessions.values()):
            self._send_off_now(session)

    def _answer_commits_in_flight(self) -> None:
        """Wait for the commits in flight and answer each (250, 451 or 452) before its session
        closes: not cut off unanswered with the message stored."""
        if self.storage.wakeup is not None:
            self.storage.finish()
            self.decide.on_commits()

    def _send_off_now(self, session: Session) -> None:
        if session.closed or session.lingering or session.conn.closed:
            return  # on its way out already
        if session.paused or session.trickling or session.preamble is not None \
                or session.handshake is not None:
            # A decision still to come (a delay, a login check) would answer into a
            # closed core; a tarpit, a PROXY header or a TLS handshake leaves no place
            # for a reply: close without one.
            self.close(session, "worker exit")
            return
        self.storage.abort(session)  # a message in DATA is not stored
        self._send_off(session, "server stopping: shutdown_timeout reached")
        self.output.flush(session)
        if not (session.closed or session.lingering):
            self.close(session, "worker exit")  # it is not reading: do not wait for it

    def _trim_buffers(self) -> None:
        """Give the large buffer back for bodies that brought less than the command
        buffer since the last tick: idle, or trickling (at min_data_rate, for up to
        data_timeout), they would hold it for nothing. The core keeps it across reads,
        since it cannot see the time between them (_fit_buffer); here a body slowing
        down costs one resize a tick at most, and one growth if it speeds up again."""
        for session in self.sessions.values():
            if session.conn.state is _DATA:
                brought = session.data_bytes - session.data_bytes_at_tick
                session.data_bytes_at_tick = session.data_bytes
                if brought < session.conn.settings.command_buffer_bytes:
                    session.conn.trim_buffer()

    def _publish_stats(self) -> None:
        """Copy the counters to the shared board, with the refusals the core has made in
        open sessions since the last publish: here, once a second, rather than per command,
        and not only at close, which a long session or a killed worker may never reach."""
        replies = self.stats.replies
        for session in self.sessions.values():
            if session.conn.refusals:
                _take_refusals(session.conn, replies)
        self.stats.publish(self.stats_board, self.slot)

    def _select_timeout(self, now: float) -> float:
        due = self.timers.next_due()
        deferred = self.acceptor.deferred_until
        if deferred and (due is None or deferred < due):
            due = deferred
        gate = self.gate
        if gate is not None and gate.table.pending and (due is None or gate.flush_at < due):
            due = gate.flush_at  # counts wait to be shared: wake up for them
        held_until = self.msglog.due  # log lines held in shared memory: out on time
        if due is None or held_until < due:
            due = held_until
        return _TICK_S if due is None else min(_TICK_S, max(0.0, due - now))

    def _read_pending_signals(self) -> None:
        if self.wakeup.pending():
            self.read_signals()

    def read_signals(self) -> None:
        arrived = self.wakeup.read()
        if arrived[signal.SIGQUIT]:
            raise SystemExit(exitcodes.OK)  # immediate stop
        if arrived[signal.SIGTERM] or arrived[signal.SIGINT]:
            self._begin_stop(time.monotonic())

    def _begin_stop(self, now: float) -> None:
        """Stop accepting; close idle sessions; let transactions in flight finish."""
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = now + self.config.server.shutdown_timeout
        self.acceptor.close()
        if self.handshakes is not None:
            self.handshakes.stop()
        for session in list(self.sessions.values()):
            if session.preamble is not None:
                self.proxies.wind_down(session)
            elif session.handshake is not None:
                self.handshakes.wind_down(session)  # then 421, once TLS is up
            elif not session.paused:
                self._maybe_send_off(session)
                self.output.flush(session)

    # -- connections ---------------------------------------------------------------

    def _start_sessions(self, accepted: Accepted) -> None:
        profiles = self.profiles
        for sock, addr, listener in accepted:
            sock.setblocking(False)
            transport = PlainTransport(sock)
            profile = profiles[listener]
            if len(self.sessions) >= self.max_connections:
                # A 421 on a plain port. On an implicit-TLS port the client expects a
                # ServerHello, and plaintext would only break its handshake, and on a
                # PROXY port nothing is said before the header (the peer may not be a
                # balancer at all): close without a word, counted as the 421 it stands
                # for, so that every refusal for too many connections counts alike.
                self.stats.replies[replies.TOO_MANY_CONNECTIONS.code] += 1
                if profile.implicit_tls or profile.proxy is not None:
                    transport.close()
                else:
                    transport.refuse(replies.TOO_MANY_CONNECTIONS.wire)
                if self.msglog.enabled:
                    self.msglog.session(addr[0], addr[1], {}, 0,
                                        "refused: too many connections", None,
                                        listener=profile.name)
                continue
            session = Session(transport, SmtpServerConnection(profile.settings),
                              Peer(addr[0], addr[1]), profile)
            self.sessions[session.fd] = session
            self.stats.connections_open += 1
            self.stats.connections_total += 1
            profile.counts.sessions += 1
            if profile.proxy is not None:  # the balancer's header first, then as below
                self.proxies.begin(session, profile.proxy, self._begin_tls
                                   if profile.implicit_tls else self._begin_plain,
                                   profile.proxy_timeout, hand_over=not profile.implicit_tls)
            elif profile.implicit_tls:
                self._begin_tls(session)
            else:
                self._begin_plain(session)
        if accepted:
            self.acceptor.publish_load()

    def _begin_plain(self, session: Session) -> None:
        self.timers.set_deadline(session, self.now + session.profile.command_timeout)
        self._greet(session)

    def _begin_tls(self, session: Session) -> None:
        # The per-client limits count an implicit-TLS session from its handshake on, so
        # that handshakes left unfinished hold their client's places, not only the
        # worker's. One over the limits is closed at once, without a word, as for too
        # many connections (no 421 in plaintext; a handshake per refusal would cost more).
        if self.gate is not None and not self.stopping and \
                (refusal := self.gate.admit(session)) is not None:
            self.stats.replies[refusal.code] += 1  # counted as the 421 it stands for
            self.close(session, "")  # session.end says why
            return
        self.handshakes.begin_implicit(session, session.transport.sock)  # then the greeting

    def _greet(self, session: Session) -> None:
        """The real peer is known here (after a PROXY header): the per-client limits count
        the session now (on an implicit-TLS listener they did before the handshake)."""
        if self.stopping:  # implicit TLS came up while the worker stops: turned away
            self.stats.replies[replies.SHUTTING_DOWN.code] += 1
            session.conn.greet(replies.SHUTTING_DOWN)
        elif self.gate is not None and not session.profile.implicit_tls and \
                (refusal := self.gate.admit(session)) is not None:
            # 421: the core closes after it; the session's log line says why
            self.stats.replies[refusal.code] += 1
            session.conn.greet(refusal)
        else:
            session.profile.decide.connect(session)
        self.flush(session)  # the greeting (a PROXY header's read may hold commands already)

    def _on_readable(self, session: Session) -> None:
        if session.lingering:
            self.output.drain(session)
            return
        conn = session.conn
        buffer = conn.buffer
        transport = session.transport
        budget = _READ_BYTES_PER_WAKEUP
        while budget > 0:
            view = buffer.free_view()
            try:
                n = transport.read_into(view)
            except (BlockingIOError, InterruptedError):
                if transport.read_wants is not READ:
                    # TLS: a record must go out first (a KeyUpdate's answer). Not READ as
                    # well: the unread bytes would wake us at once, to fail again. Once
                    # writable, flush() reads again.
                    self.want(session, WRITE)
                return
            except OSError as exc:
                self.close(session, f"read error: {exc.strerror}")
                return
            if n == 0:
                self.close(session, "client closed the connection")
                return
            buffer.end += n  # commit(n) without its check: the read fitted the free view
            budget -= n
            self.stats.bytes_received += n
            if conn.state is not _DATA:
                self.resume(session)
                if transport.has_buffered_input and not session.closed and session.mask == READ:
                    continue  # TLS: decrypted bytes wait that select() cannot see
                return
            session.data_bytes += n
            self.resume(session)
            if conn.state is _DATA and not session.closed:
                # Still in the body: its deadline moves. A read that ended the message
                # (most, for short ones) leaves that to the reply's flush.
                self._set_data_deadline(session, self.now)
            turn = self.turn
            turn.body_bytes += n
            session.body_read_at = self.now  # the turn's time: who read least recently
            if turn.body_bytes >= _TURN_BODY_BYTES:
                turn.end()  # the sessions still to come this turn wait for the next
                break
            # A body streaming in fills the buffer read after read: take the next piece
            # now rather than after another trip through select(). A read that did not
            # fill what it could take found the socket drained (a TLS read takes at most
            # one record, so only one shorter than a record says so).
            if (n < min(len(view), transport.read_limit) and not transport.has_buffered_input) \
                    or session.closed or session.mask != READ:
                return
        if transport.has_buffered_input:
            self.read_soon(session)  # the read budget ran out inside a TLS record

    def resume(self, session: Session) -> None:
        """Run the core until it wants more bytes or an answer; act on each event."""
        if session.closed:
            return
        conn = session.conn
        buffer = conn.buffer
        handlers = session.profile.handlers  # its listener's fault rules
        write = self.storage.write
        if self.stopping:  # an answer given outside (a deferred commit, a delay, a login
            self._maybe_send_off(session)  # check): before any pipelined command (after a
            # handler, below, the same: so every answer is followed by its send-off)
        while not session.paused:
            event = conn.next_event()
            kind = type(event)
            if kind is BodyChunk:
                write(session, event.data)
                continue
            if event is NEED_DATA or event is PAUSED or kind is ConnectionClosed:
                break
            handler = handlers.get(kind)
            if handler is not None:
                handler(session, event)
            if self.stopping:
                self._maybe_send_off(session)  # before any pipelined command that follows
            if buffer.start == buffer.end and conn.state is not _AUTH:
                # Answered, and nothing more buffered (the usual case without pipelining):
                # the core could only say NEED_DATA, PAUSED or closed, so skip asking.
                break
        if session.closed:
            return
        self.flush(session)

    def _maybe_send_off(self, session: Session) -> None:
        """While stopping, a session whose transaction is over gets 421 and is closed;
        after a 220 to STARTTLS, under TLS once the handshake is done (its next resume)."""
        conn = session.conn
        if self.stopping and not conn.in_transaction and not conn.closed and \
                not session.paused and conn.state is not State.STARTING_TLS:
            self._send_off(session, "server stopping")

    def _send_off(self, session: Session, end: str) -> None:
        """421 and close, counted, the log's end= saying why."""
        self.stats.replies[replies.SHUTTING_DOWN.code] += 1
        session.end = end
        session.conn.shutdown(replies.SHUTTING_DOWN)

    # -- the Loop interface (loop.py) beyond resume() ----------------------------------

    def read(self, session: Session) -> None:
        self._on_readable(session)

    def read_soon(self, session: Session) -> None:
        self.timers.call_at(self.now, self._read_buffered, session)

    def _read_buffered(self, session: Session) -> None:
        # Still wanted? The session may have paused, or be waiting to write, since.
        if session.mask == READ and not session.lingering and session.handshake is None \
                and session.transport.read_again:
            self._on_readable(session)

    def start_tls(self, session: Session) -> None:
        assert self.handshakes is not None  # the core offers STARTTLS only with a context
        self.handshakes.begin_starttls(session)

    def data_started(self, session: Session) -> None:
        session.data_bytes = session.data_bytes_at_tick = len(session.conn.buffer)
        # Read this turn already (the body's first bytes may be in): for turn.py's order.
        session.data_started = session.body_read_at = now = self.now
        self._set_data_deadline(session, now)

    def want(self, session: Session, mask: int) -> None:
        """Select on `mask` (0: not at all), with a syscall only when it changes."""
        if session.mask == mask:
            return
        if not mask:
            self.poller.unregister(session.fd)
        elif session.mask:
            self.poller.modify(session.fd, mask)
        else:
            self.poller.register(session.fd, mask, session)
        session.mask = mask

    def close(self, session: Session, reason: str) -> None:
        if session.closed:
            return
        session.closed = True
        self.timers.forget(session)
        self.storage.abort(session)
        if session.handshake is not None:
            self.handshakes.forget(session)
        if session.preamble is not None:
            self.proxies.forget(session)
        transport = session.transport
        if session.mask:
            self.poller.forget(session.fd)  # the close below takes it out of epoll's set
        self.sessions.pop(session.fd, None)
        if session.client_entry >= 0:
            self.gate.release(session)
        self.acceptor.publish_load()
        transport.close()
        session.conn.buffer.release()
        self.stats.connections_open -= 1
        conn = session.conn
        if conn.refusals:  # those since the last publish
            _take_refusals(conn, self.stats.replies)
        if self.msglog.enabled:
            end = session.end or reason or conn.close_reason or "closed"
            if conn.foreign_protocol:
                end += f" (the client sent a {conn.foreign_protocol})"
            self.msglog.session(session.peer.address, session.peer.port, conn.commands,
                                conn.errors, end, conn.tls, conn.authenticated_as,
                                listener=session.profile.name)
        if reason:
            log.debug("closed %s: %s", session.peer.address, reason)

    # -- deadlines -------------------------------------------------------------------

    def _set_data_deadline(self, session: Session, now: float) -> None:
        profile = session.profile
        deadline = min(now + profile.command_timeout,
                       session.data_started + profile.data_timeout)
        if profile.min_data_rate:
            # By time t the client must have sent min_data_rate * (t - start - grace) bytes.
            deadline = min(deadline, session.data_started + profile.rate_grace
                           + session.data_bytes / profile.min_data_rate)
        self.timers.set_deadline(session, deadline)

    def _on_deadline(self, session: Session) -> None:
        if session.preamble is not None:
            self.proxies.expire(session)  # no greeting was sent: close without a word
            return
        if session.handshake is not None:
            self.handshakes.expire(session)  # a client mid-handshake reads no reply
            return
        if session.lingering:
            self.close(session, "")
            return
        if session.paused or session.trickling:
            # Waiting on our side (a delay, the disk, a tarpit): the client is not idle.
            self.timers.set_deadline(session, self.now + session.profile.command_timeout)
            return
        log.info("timeout: peer=%s state=%s", session.peer.address, session.conn.state.value)
        session.end = f"timeout in state {session.conn.state.value}"
        self.storage.abort(session)
        self.stats.replies[replies.TIMEOUT.code] += 1
        session.conn.shutdown(replies.TIMEOUT)
        self.output.flush(session)
        if not (session.closed or session.lingering):
            self.close(session, "timeout")  # it is not reading: do not wait for it


def _in_body(owner: object) -> bool:
    """Whether `owner` is a session taking in a body (what a turn's bound defers)."""
    return owner.__class__ is Session and owner.conn.state is _DATA


def _take_refusals(conn: SmtpServerConnection, replies: list[int]) -> None:
    """Count the core's refusals not counted yet into `replies`, by code, and forget them:
    each is counted once, whether at a publish or at close."""
    for code, count in conn.refusals.items():
        replies[code] += count
    conn.refusals.clear()


def _batch_scheduling() -> None:
    """SCHED_BATCH for this thread: a worker woken by a client waits for the task running
    on that CPU (the client itself, often) instead of preempting it. Under load each
    wake-up then finds several clients ready, and CPUs switch tasks less often."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError) as exc:  # not Linux, or a sandbox that forbids it
        log.debug("worker %d: SCHED_BATCH not available: %s", os.getpid(), exc)
