"""One turn of a worker's loop: the ready events it takes, and its share of body bytes.

Untrusted input: the body bytes clients send, counted here. A turn has no clock of its
own (a clock read per event would cost the command path): the body bytes it has taken
in stand for its time, as they are what a turn can spend without bound. A body of bare
LFs to rewrite costs ~15 ms a MiB, and with hundreds of sessions streaming one, a turn
that read them all would hold every other client (and the worker's heartbeat, stamped
between turns) for tens of seconds. So once a turn has taken BODY_BYTES, the events it
has not come to wait for the next turn: epoll is level-triggered and reports them again,
and they go first there (`waiting_first`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

# At most (give or take one read) per turn, over all sessions: two sessions' worth of
# a wake-up's reads (worker.py), some 60 ms of bare-LF bodies.
BODY_BYTES = 4 * 1024 * 1024

Event = tuple[object, int]  # (owner, mask), as Poller.poll gives them


class Turn:
    """The loop sets `events` (the iterator its `for` runs on) and zeroes `body_bytes`
    at each turn; a read in DATA adds to `body_bytes` and calls `end()` past the
    bound."""

    __slots__ = ("events", "body_bytes", "left", "_in_body")

    def __init__(self, in_body: Callable[[object], bool]) -> None:
        self.events: Iterator[Event] = iter(())
        self.body_bytes = 0
        self.left: list[Event] = []  # what a turn ended early did not come to
        self._in_body = in_body  # whether an owner is a session reading a body

    def end(self) -> None:
        """No more events this turn: taking them from the loop's own iterator ends its
        `for` after the event in hand. Called again in the same turn (a read from a
        timer, after the loop), it finds the iterator empty."""
        self.left.extend(self.events)

    def waiting_first(self, events: list[Event]) -> list[Event]:
        """After a turn that ended early: all but body readers first (commands are
        short: a client waiting for a reply waits one turn at most), then the body
        readers it left waiting, in their order, then those it served. Without this,
        epoll's steady order would hand every turn to the same first streamers."""
        waiting = {owner: place for place, (owner, _) in enumerate(self.left)}
        self.left = []
        served = len(waiting)
        in_body = self._in_body

        def place(event: Event) -> int:
            owner = event[0]
            return waiting.get(owner, served) if in_body(owner) else -1
        return sorted(events, key=place)  # stable: epoll's order within each group
