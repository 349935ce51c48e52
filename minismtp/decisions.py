"""How a worker answers the protocol core's decision events: faults, delivery, counters.

Untrusted input: envelope strings and body chunks from the core (already parsed and
bounded there); they are passed to fault matching and to the delivery backend as data.
AUTH credentials go to logins.py unread.

Each decision is answered at once, or deferred: a fault rule's delay, a durable
commit on the group-commit thread (storage.py), or a password check (logins.py). A
deferred session is `paused` (the loop does not read from it) until the answer is given
and the loop is asked to `resume` it, so replies still leave in command order. The loop
is seen only through `loop.Loop`.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

from minismtp.delivery import DeliveryError
from minismtp.faults import FaultAction, FaultInjector, FaultRule
from minismtp.msglog import MessageLog
from minismtp.output import begin_tarpit, end_tarpitted_reply, output_mark
from minismtp.smtp import replies
from minismtp.smtp.events import (
    AuthAttempt, DataStarted, Hello, MailFrom, MessageEnd, MessageRejected, Quit, RcptTo,
    StartTls,
)
from minismtp.smtp.replies import Reply
from minismtp.stats import WorkerStats
from minismtp.storage import Result, Storage

if TYPE_CHECKING:
    from minismtp.clientlimits import ClientGate
    from minismtp.logins import Logins
    from minismtp.loop import Loop
    from minismtp.session import Session

log = logging.getLogger("minismtp.worker")

Answer = Callable[["Session"], None]
Refuse = Callable[["Session", Reply], None]


class Decisions:
    def __init__(self, loop: Loop, storage: Storage, faults: FaultInjector,
                 stats: WorkerStats, msglog: MessageLog, logins: Logins | None = None,
                 gate: ClientGate | None = None) -> None:
        self.loop = loop
        self.logins = logins
        self.msglog = msglog
        self.storage = storage
        self.faults = faults
        self.stats = stats
        watched = faults.stages
        self.greet_at_once = "connect" not in watched
        self.handlers: dict[type, Callable[[Session, object], None]] = {
            # Where no rule watches a stage, the event goes straight to its usual answer.
            Hello: self.hello if "helo" in watched else _accept,
            RcptTo: self.rcpt if "rcpt" in watched else _accept,
            Quit: self.quit if "quit" in watched else _accept,
            StartTls: self.starttls if "starttls" in watched else _accept,
            MailFrom: self.mail, DataStarted: self.data, MessageEnd: self.end,
            MessageRejected: self.rejected,
        }
        if logins is not None:  # the core sends AuthAttempt only where AUTH is offered
            self.handlers[AuthAttempt] = self.auth if "auth" in watched else logins.submit
        self.gate = gate
        if gate is not None and gate.max_recipients:  # limits.per_client: checked first
            self.handlers[RcptTo] = gate.check_recipients(self.handlers[RcptTo],
                                                          self._refuse_overshoot)

    # -- one method per decision; `check()` is one dict lookup when no rule exists ----

    def _decide(self, session: Session, stage: str, proceed: Answer, refuse: Refuse,
                sender: str | None = None, recipients: tuple[str, ...] = ()) -> None:
        """Answer as usual (`proceed`), unless a fault rule fires at `stage`."""
        if stage not in self.faults.stages:  # no rule watches this stage: the fast case
            proceed(session)
            return
        action = self.faults.check(stage, session.peer.address, sender, recipients)
        if action is None:
            proceed(session)
        else:
            self._inject(session, action, proceed, refuse)

    def connect(self, session: Session) -> None:
        if self.greet_at_once:
            session.conn.greet()
        else:
            self._decide(session, "connect", self._greet, _greet_with)

    def _greet(self, session: Session) -> None:
        if self.loop.stopping:  # a connect delay ended while the worker stops: one 421
            self.stats.replies[replies.SHUTTING_DOWN.code] += 1
            session.end = "server stopping"
            session.conn.greet(replies.SHUTTING_DOWN)
        else:
            session.conn.greet()

    def hello(self, session: Session, event: Hello) -> None:
        self._decide(session, "helo", _accept, _reject)

    def mail(self, session: Session, event: MailFrom) -> None:
        self._decide(session, "mail", self._accept_mail, _reject, event.sender)

    def _accept_mail(self, session: Session) -> None:
        self.stats.transactions += 1
        session.conn.accept()

    def rcpt(self, session: Session, event: RcptTo) -> None:
        self._decide(session, "rcpt", _accept, _reject, session.conn.sender,
                     (event.recipient,))

    def data(self, session: Session, event: DataStarted) -> None:
        session.envelope = envelope = event.envelope
        self._decide(session, "data", self._start_message, _reject, envelope.sender,
                     envelope.recipients)

    def _start_message(self, session: Session) -> None:
        if (error := self.storage.open(session)) is not None:
            self._refuse(session, _storage_failure(error))
            return
        session.conn.accept()
        self.loop.data_started(session)

    def end(self, session: Session, event: MessageEnd) -> None:
        session.end_seen = time.monotonic()
        session.size = event.size
        envelope = session.envelope
        self._decide(session, "end_of_data", self._store, self._refuse_message,
                     envelope.sender, envelope.recipients)

    def rejected(self, session: Session, event: MessageRejected) -> None:
        self.storage.abort(session)
        self._log(session, event.size, f"rejected: {event.reason}", "-")

    def starttls(self, session: Session, event: StartTls) -> None:
        """A rule may refuse it (454 4.7.0, say) or drop the connection, so that load
        tests can exercise a client's fallback to plaintext."""
        self._decide(session, "starttls", _accept, _reject)

    def auth(self, session: Session, event: AuthAttempt) -> None:
        """A rule may refuse it (454, say) or drop the connection before any password
        check; otherwise logins.py checks it off the loop and answers later."""
        assert self.logins is not None
        check = self.logins.submit
        self._decide(session, "auth", lambda session: check(session, event), _reject)

    def quit(self, session: Session, event: Quit) -> None:
        # The sender of the transaction QUIT ends, or else of the session's last message
        # (none: a rule with a sender does not match).
        conn, last = session.conn, session.envelope
        sender = conn.sender if conn.in_transaction else None if last is None else last.sender
        self._decide(session, "quit", _accept, _reject, sender)

    # -- storing a message -------------------------------------------------------

    def _store(self, session: Session) -> None:
        result = self.storage.commit(session)
        if result is not None:
            self._answer_end(session, result)

    def on_commits(self) -> None:
        """Deferred commits are done: answer each message."""
        for session, result in self.storage.take_done():
            if session.closed:
                if isinstance(result, str):
                    log.info("id=%s stored, but the client left before the reply", result)
                continue
            session.paused = False
            self._answer_end(session, result)
            if session.tarpits:
                end_tarpitted_reply(session)
            self.loop.resume(session)  # pipelined commands may wait behind the reply

    def _answer_end(self, session: Session, result: Result) -> None:
        self.stats.observe_latency(time.monotonic() - session.end_seen)
        if isinstance(result, str):
            self.stats.messages_accepted += 1
            session.profile.counts.messages_accepted += 1
            session.conn.accept(result)
            self._log(session, session.size, "250 queued", result)
        else:
            log.error("cannot store message from %s: %s", session.peer.address, result)
            reply = _storage_failure(result)
            self.stats.replies[reply.code] += 1
            session.conn.reject(reply)
            why = "storage full" if reply is replies.STORAGE_FULL else "local error"
            self._log(session, session.size, f"{reply.code} {why}", "-")

    def _refuse_message(self, session: Session, reply: Reply) -> None:
        self.storage.abort(session)
        self.stats.observe_latency(time.monotonic() - session.end_seen)
        session.conn.reject(reply)  # counted by _inject
        self._log(session, session.size, f"{reply.code} injected", "-")

    def _refuse(self, session: Session, reply: Reply) -> None:
        self.stats.replies[reply.code] += 1
        session.conn.reject(reply)

    def _refuse_overshoot(self, session: Session, reply: Reply) -> None:
        """A RCPT past the client's rate: counted as one past max_recipients is, so that
        a session cannot go on sending them, each reply restarting its idle time."""
        self.stats.replies[reply.code] += 1
        session.conn.reject(reply, overshoot=True)

    def _log(self, session: Session, size: int, result: str, queue_id: str) -> None:
        if self.msglog.enabled:
            envelope = session.envelope
            self.msglog.message(queue_id, session.peer.address, envelope.sender,
                                len(envelope.recipients), size, envelope.tls, result,
                                envelope.authenticated_as, listener=session.profile.name)

    # -- fault injection ---------------------------------------------------------

    def _inject(self, session: Session, action: FaultAction, proceed: Answer,
                refuse: Refuse) -> None:
        """Apply a fired rule: after its delay, drop the connection, refuse with its
        reply, or answer as usual; a tarpit then sends that answer slowly."""
        self.stats.faults[action.rule.index] += 1

        def finish(session: Session) -> None:
            # This reply slowly, neither those queued before it nor those after it.
            span = begin_tarpit(session, action.tarpit_bps) if action.tarpit_bps else None
            act(session)
            if span is not None and not session.paused:
                span.end = output_mark(session)  # else where its deferred answer ends

        def act(session: Session) -> None:
            if action.disconnect:
                # The core closes; the loop then sends what earlier commands were
                # answered (their replies may wait behind this one) and closes. A
                # message being stored is dropped now, not when the socket closes.
                self.storage.abort(session)
                session.conn.disconnect(f"fault rule {action.rule.name}: disconnect")
            elif action.reply is not None:
                self.stats.replies[action.reply.code] += 1
                refuse(session, action.reply)
            else:
                proceed(session)

        if action.delay_s <= 0:
            finish(session)
            return
        session.paused = True

        def after_delay(session: Session) -> None:
            session.paused = False
            if self._left_during_delay(session, action.rule):
                return
            finish(session)
            self.loop.resume(session)

        self.loop.timers.call_at(self.loop.now + action.delay_s, after_delay, session)

    def _left_during_delay(self, session: Session, rule: FaultRule) -> bool:
        """Whether the client left while a delay held its session (it is not read
        meanwhile): then the command is not acted on, a message not stored (no client
        saw its 250, and a retry would store it twice), and the session closes, its log
        line saying why. What the client sent before a half-close, still to be read
        (a pipelined QUIT), means it may still read the answer: not gone. At the end of
        a message only a reset is leaving: a client that sent it whole and shut its side
        (`nc -N`) waits for the 250, and the message must not be lost for that."""
        if len(session.conn.buffer) or not session.transport.peer_gone(
                reset_only=rule.stage == "end_of_data"):
            return False
        why = f"client left during the delay of fault rule {rule.name}"
        if rule.stage == "end_of_data":
            self.storage.abort(session)
            self._log(session, session.size, "client left during a delay", "-")
        self.loop.close(session, why)
        return True


def _storage_failure(error: DeliveryError) -> Reply:
    """The answer to a message we could not store: the disk or a quota full, or else."""
    return replies.STORAGE_FULL if error.full else replies.LOCAL_ERROR


def _accept(session: Session, event: object = None) -> None:
    session.conn.accept()


def _reject(session: Session, reply: Reply) -> None:
    session.conn.reject(reply)


def _greet_with(session: Session, reply: Reply) -> None:
    session.conn.greet(reply)
