"""Replies going out: from the core's output to the client, and the session's last words.

Untrusted input: none read here except what a lingering client still sends (drained and
dropped, a bounded amount per event). The hazard is a client that does not read: reply
bytes the socket does not take wait in the transport, and the loop stops reading from
that client until they are gone, so its pipelined commands cannot make us buffer
replies without bound.

A tarpit fault sends a reply a few bytes per step on a timer (`trickle`): only that
reply, the span of the output between where it starts and where it ends (`TarpitSpan`,
recorded by decisions.py as it is queued); what comes before and after it goes at full
speed. A closing session shuts its write side and drains what the client still sends
before closing (`linger`), so a reset cannot destroy the last reply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from minismtp.loop import READ, Loop
from minismtp.smtp.protocol import State
from minismtp.transport import MSG_MORE

if TYPE_CHECKING:
    from minismtp.session import Session

# Globals: Enum class attributes are slow to read.
_DATA, _CLOSED, _STARTING_TLS = State.DATA, State.CLOSED, State.STARTING_TLS
# A tarpitted reply goes out in pieces of this long's worth of octets (one at least), so
# about this far apart, or 1/rate under 10 bytes/s.
TARPIT_STEP_S = 0.1
LINGER_S = 2.0  # after a last reply, how long unread client bytes are drained


class TarpitSpan:
    """One tarpitted reply: where it lies in the output not sent yet (octet offsets, moved
    back as octets go out), and how far its trickle has got."""

    __slots__ = ("start", "end", "bps", "started", "sent")

    def __init__(self, start: int, bps: float) -> None:
        self.start = start
        self.end: int | None = None  # unknown while its answer is deferred
        self.bps = bps
        self.started = 0.0  # when its first piece went out: it is paced from there
        self.sent = 0  # its octets out so far

    def due(self, now: float) -> int:
        """Octets of it that may go out by `now`: a step at once, then `bps` a second
        from the running total (so no rate is rounded to whole steps)."""
        step = max(1, int(self.bps * TARPIT_STEP_S))
        if not self.sent:
            return step
        # The epsilon: at exactly started + sent/bps the product may fall just short.
        return max(1, int((now - self.started) * self.bps + 1e-6) + step - self.sent)

    def next_step_at(self) -> float:
        """When the next step is due: a step's worth of octets after those sent."""
        return self.started + self.sent / self.bps


def _advance(spans: list[TarpitSpan], sent: int) -> None:
    """`sent` octets went out: the spans lie that much nearer the front."""
    for span in spans:
        span.start = max(0, span.start - sent)
        if span.end is not None:
            span.end -= sent


def output_mark(session: Session) -> int:
    """Where the next reply queued will start, in the output not sent yet."""
    return len(session.transport.pending) + session.conn.queued_bytes


def begin_tarpit(session: Session, bps: float) -> TarpitSpan:
    """The reply about to be queued goes out at `bps`: its span starts here; each
    tarpitted reply of a pipelined batch has its own, trickled in order."""
    span = TarpitSpan(output_mark(session), bps)
    if session.tarpits is None:
        session.tarpits = [span]
    else:
        session.tarpits.append(span)
    return span


def end_tarpitted_reply(session: Session) -> None:
    """A deferred answer (a commit, a password check) was just queued: a span waiting
    for it ends here. Called only for sessions with spans."""
    span = session.tarpits[-1]
    if span.end is None:
        span.end = output_mark(session)


class Output:
    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.timers = loop.timers  # the loop's own, for as long as it runs

    def flush(self, session: Session) -> None:
        """Send what the core has queued, then watch the connection for what comes next:
        writable while replies wait, readable otherwise, nothing while a decision is
        pending (pipelined commands wait, in the kernel or the core's buffer, until it is
        answered)."""
        if session.closed or session.trickling or session.lingering:
            return
        conn = session.conn
        transport = session.transport
        out = conn.data_to_send()
        if out and conn.state is not _DATA:
            # A reply means a command completed: the idle clock starts again.
            self.timers.set_deadline(session, self.loop.now + session.profile.command_timeout)
        pending = transport.pending
        if out or pending:
            if pending:
                out = pending + out
            if session.tarpits:
                transport.pending = out
                self._start_trickle(session)
                return
            try:
                # A last reply waits for the FIN that follows at once (linger), so the
                # two leave as one segment: one wake-up of the client instead of two.
                sent = transport.write(out, MSG_MORE if conn.state is _CLOSED else 0)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.loop.close(session, f"write error: {exc.strerror}")
                return
            if sent < len(out):
                transport.pending = out[sent:]
                # Stop reading until the client takes replies (a TLS write may instead
                # wait for a record to be read: then READ).
                self.loop.want(session, transport.write_wants)
                return
            if pending:
                transport.pending = b""
        if conn.state is _CLOSED:
            self.linger(session)
        elif conn.state is _STARTING_TLS:
            self.loop.start_tls(session)  # the 220 is out, all of it
        elif session.paused:
            self.loop.want(session, 0)
        elif session.mask != READ:
            self.loop.want(session, READ)
            if transport.read_again:
                # TLS: reading stopped (a decision, replies waiting) with a record only
                # partly read; the rest is decrypted inside OpenSSL, where select() cannot
                # see it, and the client may send nothing more until it is answered. Or a
                # read waited for the socket to take a record of ours (worker.py): the
                # client's bytes may all be inside OpenSSL by now, so retry it.
                self.loop.read_soon(session)

    # -- tarpit --------------------------------------------------------------------

    def _start_trickle(self, session: Session) -> None:
        self.loop.want(session, 0)  # nothing more is read until every span is out
        session.trickling = True
        self.trickle(session)

    def trickle(self, session: Session) -> None:
        """One step of a tarpit: the output before the first span at full speed, then as
        much of the span as is due; the next span, if this one is out, likewise. Timed
        again until every span is out; then the session resumes, and the output after
        the last span goes at full speed."""
        loop = self.loop
        transport = session.transport
        spans = session.tarpits
        out = session.conn.data_to_send()  # an answer given while trickling
        if out:
            transport.pending += out
        while spans:
            span = spans[0]
            if span.end is None:  # its answer is still to come: send what is before it
                sent = self._send_pending(session, span.start)
                if sent is None:
                    return
                _advance(spans, sent)
                if transport.pending:
                    self.timers.call_at(loop.now + TARPIT_STEP_S, self.trickle, session)
                else:
                    session.trickling = False  # the answer's flush starts the next step
                return
            before = span.start
            wanted = min(span.end, before + span.due(loop.now))
            sent = self._send_pending(session, wanted)
            if sent is None:
                return
            _advance(spans, sent)
            if sent > before:
                if not span.sent:
                    span.started = loop.now
                span.sent += sent - before
            if span.end > 0:
                self.timers.call_at(self._next_step_at(span, sent < wanted), self.trickle,
                                    session)
                return
            spans.pop(0)
        session.tarpits = None
        session.trickling = False
        if session.conn.state is _DATA:
            # The 354 has only now reached the client: DATA's deadlines start here, not
            # when it was queued, or the tarpit's time would count as the client's.
            loop.data_started(session)
        loop.resume(session)

    def _next_step_at(self, span: TarpitSpan, short: bool) -> float:
        if not short:
            return span.next_step_at()
        # The socket took less than was due: try again a step later, paced from then, so
        # a client that stops reading meets no burst when it starts again.
        at = self.loop.now + TARPIT_STEP_S
        span.started = at - span.sent / span.bps
        return at

    def _send_pending(self, session: Session, most: int) -> int | None:
        """Send at most `most` octets of the pending output, as many as the socket takes
        now, and drop them from it: how many, or None if the connection failed (closed).
        Under TLS a write that blocked is retried whole, however small `most` is."""
        transport = session.transport
        most = max(most, transport.write_retry_bytes)
        if not most:
            return 0
        try:
            sent = transport.write(transport.pending[:most], 0)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.loop.close(session, f"write error: {exc.strerror}")
            return None
        transport.pending = transport.pending[sent:]
        return sent

    # -- the end ---------------------------------------------------------------------

    def linger(self, session: Session) -> None:
        """Close after a last reply without letting a reset destroy it.

        Closing a socket that still has unread client bytes (pipelined commands after a
        421, say) sends RST, and the client's kernel may then drop our reply before the
        client reads it. So shut our side, read and discard until the client closes or
        LINGER_S passes, then close (the "lingering close" of HTTP servers). After QUIT
        the client has nothing more to say: close at once.
        """
        loop = self.loop
        if session.conn.close_reason == "quit" and not len(session.conn.buffer):
            loop.close(session, "")
            return
        if not session.transport.shutdown_write():
            loop.close(session, "")
            return
        session.lingering = True
        loop.want(session, READ)
        self.timers.set_deadline(session, loop.now + LINGER_S)

    def drain(self, session: Session) -> None:
        """A lingering client sent more: drop it; close once it is done."""
        if session.transport.discard_input():
            self.loop.close(session, "")
