"""How a worker answers the protocol core's decision events: faults, delivery, counters.

Untrusted input: envelope strings and body chunks from the core (already parsed and
bounded there); they are passed to fault matching and to the delivery backend as data.

Each decision is answered at once, or deferred: a fault rule's delay, or a durable
commit on the group-commit thread. A deferred session is `paused` (the worker does not
read from it) until the answer is given and the worker is asked to `resume` it, so
replies still leave in command order.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

from minismtp.smtp import replies
from minismtp.delivery import DeliveryError
from minismtp.delivery.group import GroupCommitter
from minismtp.smtp.events import (
    DataStarted, Hello, MailFrom, MessageEnd, MessageRejected, Quit, RcptTo, Reset,
)
from minismtp.faults import FaultAction, FaultInjector
from minismtp.smtp.replies import Reply
from minismtp.stats import WorkerStats

if TYPE_CHECKING:
    from minismtp.session import Session
    from minismtp.worker import Worker

log = logging.getLogger("minismtp.worker")

Answer = Callable[["Session"], None]
Refuse = Callable[["Session", Reply], None]


class Decisions:
    def __init__(self, worker: Worker, faults: FaultInjector, stats: WorkerStats) -> None:
        self.worker = worker
        self.faults = faults
        self.stats = stats
        self.backend = worker.backend
        self.committer: GroupCommitter[tuple[Session, int]] | None = (
            GroupCommitter(worker.backend) if worker.backend.commit_blocks else None)
        watched = faults.stages
        self.greet_at_once = "connect" not in watched
        self.handlers: dict[type, Callable[[Session, object], None]] = {
            # Where no rule watches a stage, the event goes straight to its usual answer.
            Hello: self.hello if "helo" in watched else _accept_hello,
            RcptTo: self.rcpt if "rcpt" in watched else _accept,
            Quit: self.quit if "quit" in watched else _accept,
            MailFrom: self.mail, DataStarted: self.data, MessageEnd: self.end,
            MessageRejected: self.rejected, Reset: self.reset,
        }

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
            self._decide(session, "connect", _greet, _greet_with)

    def hello(self, session: Session, event: Hello) -> None:
        self._decide(session, "helo", _accept_hello, _reject)

    def mail(self, session: Session, event: MailFrom) -> None:
        session.sender = event.sender
        self._decide(session, "mail", self._accept_mail, _reject, event.sender)

    def _accept_mail(self, session: Session) -> None:
        self.stats.transactions += 1
        session.conn.accept()

    def rcpt(self, session: Session, event: RcptTo) -> None:
        self._decide(session, "rcpt", _accept, _reject, session.sender, (event.recipient,))

    def data(self, session: Session, event: DataStarted) -> None:
        session.envelope = envelope = event.envelope
        self._decide(session, "data", self._start_message, _reject, envelope.sender,
                     envelope.recipients)

    def _start_message(self, session: Session) -> None:
        try:
            session.sink = self.backend.open(session.envelope, session.peer)
        except DeliveryError as exc:
            log.error("cannot store message from %s: %s", session.peer.address, exc)
            self._refuse(session, replies.LOCAL_ERROR)
            return
        session.sink_failed = False
        session.conn.accept()
        self.worker.data_started(session)

    def end(self, session: Session, event: MessageEnd) -> None:
        session.end_seen = time.monotonic()
        session.size = event.size
        envelope = session.envelope
        self._decide(session, "end_of_data", self._store, self._refuse_message,
                     envelope.sender, envelope.recipients)

    def rejected(self, session: Session, event: MessageRejected) -> None:
        self.worker.abort_message(session)
        self._log(session, event.size, f"rejected: {event.reason}", "-")
        session.sender = ""

    def reset(self, session: Session, event: Reset) -> None:
        session.sender = ""  # no transaction: later rules must not match the old sender

    def quit(self, session: Session, event: Quit) -> None:
        self._decide(session, "quit", _accept, _reject, session.sender)

    # -- storing a message -------------------------------------------------------

    def _store(self, session: Session) -> None:
        sink, session.sink = session.sink, None
        if sink is None or session.sink_failed:
            self._answer_end(session, DeliveryError("write failed"))
        elif self.committer is not None:
            session.paused = True  # the reply waits for the disk; other clients do not
            self.committer.submit((session, session.size), sink)
        else:
            try:
                result: str | DeliveryError = sink.commit()
            except DeliveryError as exc:
                result = exc
            self._answer_end(session, result)

    def on_commits(self) -> None:
        """The group-commit thread finished a batch: answer each message."""
        assert self.committer is not None
        for (session, size), result in self.committer.take_done():
            if session.closed:
                if isinstance(result, str):
                    log.info("id=%s stored, but the client left before the reply", result)
                continue
            session.paused = False
            self._answer_end(session, result)
            self.worker.resume(session)  # pipelined commands may wait behind the reply

    def _answer_end(self, session: Session, result: str | DeliveryError) -> None:
        self.stats.observe_latency(time.monotonic() - session.end_seen)
        if isinstance(result, str):
            self.stats.messages_accepted += 1
            session.conn.accept(result)
            self._log(session, session.size, "250 queued", result)
        else:
            log.error("cannot store message from %s: %s", session.peer.address, result)
            self.stats.replies[replies.LOCAL_ERROR.code] += 1
            session.conn.reject(replies.LOCAL_ERROR)
            self._log(session, session.size, "451 local error", "-")
        session.sender = ""

    def _refuse_message(self, session: Session, reply: Reply) -> None:
        self.worker.abort_message(session)
        self.stats.observe_latency(time.monotonic() - session.end_seen)
        session.conn.reject(reply)  # counted by _inject
        self._log(session, session.size, f"{reply.code} injected", "-")
        session.sender = ""

    def _refuse(self, session: Session, reply: Reply) -> None:
        self.stats.replies[reply.code] += 1
        session.conn.reject(reply)

    def _log(self, session: Session, size: int, result: str, queue_id: str) -> None:
        if log.isEnabledFor(logging.INFO):
            envelope = session.envelope
            log.info("id=%s peer=%s from=<%s> rcpts=%d size=%d result=%s", queue_id,
                     session.peer.address, envelope.sender, len(envelope.recipients), size,
                     result)

    # -- fault injection ---------------------------------------------------------

    def _inject(self, session: Session, action: FaultAction, proceed: Answer,
                refuse: Refuse) -> None:
        """Apply a fired rule: after its delay, drop the connection, refuse with its
        reply, or answer as usual; a tarpit then sends that answer slowly."""
        self.stats.faults[action.rule.index] += 1
        if action.tarpit_bps:
            session.tarpit_bps = action.tarpit_bps

        def finish(session: Session) -> None:
            if action.disconnect:
                self.worker.drop(session, f"fault rule {action.rule.name}: disconnect")
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
            finish(session)
            self.worker.resume(session)

        self.worker.timers.call_at(time.monotonic() + action.delay_s, after_delay, session)


def _accept(session: Session, event: object = None) -> None:
    session.conn.accept()


def _accept_hello(session: Session, event: object = None) -> None:
    session.sender = ""  # an accepted HELO/EHLO ends any transaction
    session.conn.accept()


def _reject(session: Session, reply: Reply) -> None:
    session.conn.reject(reply)


def _greet(session: Session) -> None:
    session.conn.greet()


def _greet_with(session: Session, reply: Reply) -> None:
    session.conn.greet(reply)
