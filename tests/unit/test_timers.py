"""Timers: lazy deadlines, one-shot calls, and no memory kept for closed owners."""

from minismtp.timers import Timers


class Owner:
    def __init__(self) -> None:
        self.deadline = 0.0
        self.timer_at = float("inf")
        self.closed = False


def test_deadline_fires_once_when_due() -> None:
    timers, owner, fired = Timers(), Owner(), []
    timers.set_deadline(owner, 10.0)
    timers.expire(9.9, fired.append)
    assert fired == []
    timers.expire(10.0, fired.append)
    assert fired == [owner]
    timers.expire(99.0, fired.append)
    assert fired == [owner]


def test_a_later_deadline_is_requeued_not_fired() -> None:
    timers, owner, fired = Timers(), Owner(), []
    timers.set_deadline(owner, 10.0)
    timers.set_deadline(owner, 20.0)  # no new heap entry: the old one is pushed on later
    assert len(timers) == 1
    timers.expire(15.0, fired.append)
    assert fired == [] and timers.next_due() == 20.0
    timers.expire(20.0, fired.append)
    assert fired == [owner]


def test_an_earlier_deadline_supersedes_the_queued_one() -> None:
    timers, owner, fired = Timers(), Owner(), []
    timers.set_deadline(owner, 20.0)
    timers.set_deadline(owner, 5.0)
    timers.expire(5.0, fired.append)
    assert fired == [owner]
    timers.expire(30.0, fired.append)
    assert fired == [owner]  # the superseded 20.0 entry is skipped


def test_calls_run_in_time_order_and_skip_closed_owners() -> None:
    timers, a, b, ran = Timers(), Owner(), Owner(), []
    timers.call_at(2.0, lambda o: ran.append("b"), b)
    timers.call_at(1.0, lambda o: ran.append("a"), a)
    b.closed = True
    timers.expire(3.0, lambda o: None)
    assert ran == ["a"]


def test_closed_owners_do_not_pile_up() -> None:
    timers = Timers()
    for n in range(50_000):  # connections that set an idle deadline, then a DATA one
        owner = Owner()
        timers.set_deadline(owner, 300.0 + n)
        timers.set_deadline(owner, 5.0 + n)
        owner.closed = True
        timers.forget(owner)
    assert len(timers) <= 4 * Timers._MIN_PURGE
    live = Owner()
    timers.set_deadline(live, 1.0)
    fired: list[Owner] = []
    timers.expire(400.0, fired.append)
    assert fired == [live]
