"""The tarpit fault's pacing and spans (output.py), on a fake loop and transport: when
each octet goes out, with the loop's clock moved from one timer to the next."""

from __future__ import annotations

import types

import pytest

from minismtp.output import TARPIT_STEP_S, Output, begin_tarpit, output_mark
from minismtp.timers import Timers

REPLY = b"450 4.2.0 " + b"x" * 84 + b"\r\n"  # 96 octets


class FakeLoop:
    """What output.py's tarpit uses of the worker's loop."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers = Timers()
        self.resumed = 0

    def want(self, session, mask: int) -> None:
        session.mask = mask

    def close(self, session, reason: str) -> None:
        raise AssertionError(f"closed: {reason}")

    def resume(self, session) -> None:
        self.resumed += 1

    def run(self, limit_s: float = 600.0) -> None:
        """Move the clock to each timer in turn, as a loop that is never late."""
        while (due := self.timers.next_due()) is not None and due <= limit_s:
            self.now = max(self.now, due)
            self.timers.expire(self.now, lambda owner: None)


class FakeConn:
    state = None

    def __init__(self) -> None:
        self.out: list[bytes] = []

    @property
    def queued_bytes(self) -> int:
        return sum(map(len, self.out))

    def data_to_send(self) -> bytes:
        data = b"".join(self.out)
        self.out.clear()
        return data


class Recorder:
    """A transport whose socket takes everything, noting when each octet went."""

    def __init__(self, loop: FakeLoop) -> None:
        self.loop = loop
        self.pending = b""
        self.write_retry_bytes = 0
        self.writes: list[tuple[float, bytes]] = []

    def write(self, data, flags: int = 0) -> int:
        self.writes.append((self.loop.now, bytes(data)))
        return len(data)

    def sent_by(self) -> list[tuple[float, int]]:
        """(time, octets sent so far) after each write."""
        total, out = 0, []
        for at, data in self.writes:
            total += len(data)
            out.append((at, total))
        return out

    def done_at(self, octets: int) -> float:
        """When the first `octets` octets had all gone out."""
        return next(at for at, total in self.sent_by() if total >= octets)


def session_on(loop: FakeLoop) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        transport=Recorder(loop), conn=FakeConn(), mask=0, closed=False, paused=False,
        trickling=False, lingering=False, tarpits=None, deadline=0.0,
        timer_at=float("inf"), profile=types.SimpleNamespace(command_timeout=300.0))


def queue(session, reply: bytes, bps: float | None = None) -> None:
    """Queue a reply in the core, tarpitted at `bps` if given (as decisions.py does)."""
    span = None if bps is None else begin_tarpit(session, bps)
    session.conn.out.append(reply)
    if span is not None:
        span.end = output_mark(session)


def trickle(session, loop: FakeLoop) -> None:
    output = Output(loop)
    session.transport.pending = session.conn.data_to_send()
    output._start_trickle(session)
    loop.run()
    assert not session.trickling and session.tarpits is None and loop.resumed == 1


@pytest.mark.parametrize("bps", [1, 3, 5, 10, 15, 19, 25, 39, 100, 1000])
def test_a_tarpit_keeps_to_its_rate_within_a_step(bps):
    """No octet goes out before its time (a step's worth at once, then `bps` a second
    from the running total), and the reply is out within a step of that time: a rate
    is not rounded to a multiple of the steps' 10 a second."""
    loop = FakeLoop()
    session = session_on(loop)
    queue(session, REPLY, bps)
    trickle(session, loop)
    recorder = session.transport
    assert b"".join(data for _, data in recorder.writes) == REPLY
    step = max(1, int(bps * TARPIT_STEP_S))
    for at, total in recorder.sent_by():
        assert total <= step + at * bps + 1e-6, (at, total)
    ideal = (len(REPLY) - step) / bps
    assert ideal - 1e-6 <= recorder.done_at(len(REPLY)) <= ideal + TARPIT_STEP_S


def test_the_steps_are_no_more_than_a_tenth_of_a_second_apart():
    loop = FakeLoop()
    session = session_on(loop)
    queue(session, REPLY, 20)
    trickle(session, loop)
    times = [at for at, _ in session.transport.writes]
    assert all(0 < b - a <= TARPIT_STEP_S + 1e-9 for a, b in zip(times, times[1:])), times
    assert [len(data) for _, data in session.transport.writes] == [2] * (len(REPLY) // 2)


def test_a_late_timer_is_made_up_in_its_step():
    """A loop busy elsewhere runs a step late: that step sends what fell due meanwhile,
    so the reply still ends on time."""
    loop = FakeLoop()
    session = session_on(loop)
    queue(session, REPLY, 10)
    session.transport.pending = session.conn.data_to_send()
    Output(loop)._start_trickle(session)
    loop.now = 2.05  # the first timer (0.1 s) runs 1.95 s late
    loop.timers.expire(loop.now, lambda owner: None)
    assert session.transport.sent_by()[-1] == (2.05, 21)  # 1 at once, then 20 in 2 s
    loop.run()
    assert session.transport.done_at(len(REPLY)) == pytest.approx((len(REPLY) - 1) / 10)


def test_only_the_tarpitted_replies_are_slow():
    """Replies before, between and after two tarpitted ones (a pipelined batch) go at
    full speed: each with the first piece of the span after it, the last when the last
    span is out (the session's resume sends it)."""
    loop = FakeLoop()
    session = session_on(loop)
    before, between, after = b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n" * 3, b"221 2.0.0 Bye\r\n"
    slow1, slow2 = b"250 2.1.5 One\r\n", b"250 2.1.5 Two, longer\r\n"
    queue(session, before)
    queue(session, slow1, 10)
    queue(session, between)
    queue(session, slow2, 20)
    queue(session, after)
    trickle(session, loop)
    writes = session.transport.writes
    assert writes[0] == (0.0, before + slow1[:1])
    one_done = session.transport.done_at(len(before + slow1))
    assert one_done == pytest.approx((len(slow1) - 1) / 10)
    at, data = next((at, data) for at, data in writes if data.startswith(between))
    assert (at, data) == (one_done, between + slow2[:2])
    two_done = session.transport.done_at(len(before + slow1 + between + slow2))
    ideal = one_done + (len(slow2) - 2) / 20  # 2 octets a step at 20 B/s: an odd one left
    assert ideal <= two_done <= ideal + TARPIT_STEP_S
    assert b"".join(data for _, data in writes) == before + slow1 + between + slow2
    assert session.transport.pending == after  # left for the resume's flush


def test_a_span_whose_answer_is_deferred_waits_for_it():
    """The answer is still to come (a commit, a password check): what is before it goes
    at once and the trickle stops; once it is queued the next flush trickles it, and
    only it."""
    loop = FakeLoop()
    session = session_on(loop)
    output = Output(loop)
    queue(session, b"250 2.0.0 Ok\r\n")
    span = begin_tarpit(session, 10)
    session.paused = True
    output.flush(session)
    assert session.transport.writes == [(0.0, b"250 2.0.0 Ok\r\n")]
    assert not session.trickling and session.tarpits == [span]
    loop.now = 1.0
    session.paused = False
    session.conn.out.append(b"250 2.0.0 Ok: queued as X\r\n")
    span.end = output_mark(session)
    session.conn.out.append(b"221 2.0.0 Bye\r\n")  # a pipelined QUIT, answered at once
    output.flush(session)
    loop.run()
    assert loop.resumed == 1 and session.transport.pending == b"221 2.0.0 Bye\r\n"
    assert session.transport.writes[1] == (1.0, b"2")
    assert session.transport.done_at(14 + 27) == pytest.approx(1.0 + 26 / 10)
