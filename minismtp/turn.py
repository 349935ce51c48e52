"""One turn of a worker's loop: the ready events it takes, and its share of body bytes.

Untrusted input: the body bytes clients send, counted here. A turn has no clock of its
own (a clock read per event would cost the command path): the body bytes it has taken
in stand for its time, as they are what a turn can spend without bound. A body of bare
LFs to rewrite costs ~15 ms a MiB, and with hundreds of sessions streaming one, a turn
that read them all would hold every other client (and the worker's heartbeat, stamped
between turns) for tens of seconds. So once a turn has taken BODY_BYTES, the events it
has not come to wait for the next turn: epoll is level-triggered and reports them again.

Who reads first then is decided per session, not per turn: each body read stamps its
session with the turn's time (`Session.body_read_at`), and a turn after one that ended
early takes the body readers least recently read first (`least_read_first`). A poll
returns at most a few hundred events (poller.py) and epoll hands out the rest in later
polls, so the sessions one turn left waiting are often not in the next one's events at
all: a list of them kept from turn to turn would be forgotten before they came round.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

# At most (give or take one read) per turn, over all sessions: two sessions' worth of
# a wake-up's reads (worker.py), some 60 ms of bare-LF bodies.
BODY_BYTES = 4 * 1024 * 1024

Event = tuple[object, int]  # (owner, mask), as Poller.poll gives them

_FIRST = float("-inf")  # the place of every event but a body read: commands are short


class Turn:
    """The loop sets `events` (the iterator its `for` runs on) and zeroes `body_bytes`
    at each turn; a read in DATA adds to `body_bytes`, stamps its session, and calls
    `end()` past the bound."""

    __slots__ = ("events", "body_bytes", "cut", "_in_body")

    def __init__(self, in_body: Callable[[object], bool]) -> None:
        self.events: Iterator[Event] = iter(())
        self.body_bytes = 0
        self.cut = False  # a turn ended early: the next one orders its events
        self._in_body = in_body  # whether an owner is a session reading a body

    def end(self) -> None:
        """No more events this turn: emptying the loop's own iterator ends its `for`
        after the event in hand. Called again in the same turn (a read from a timer,
        after the loop), it finds the iterator empty."""
        self.cut = True
        deque(self.events, maxlen=0)

    def least_read_first(self, events: list[Event]) -> list[Event]:
        """After a turn that ended early: all but body readers first (a client waiting
        for a reply to a command waits one turn at most), then the body readers, least
        recently read first. Without this, epoll's steady order would hand every turn
        to the same first streamers, and the others' deadlines would pass."""
        self.cut = False
        in_body = self._in_body

        def place(event: Event) -> float:
            owner = event[0]
            return owner.body_read_at if in_body(owner) else _FIRST  # type: ignore[attr-defined]
        return sorted(events, key=place)  # stable: epoll's order among equals
