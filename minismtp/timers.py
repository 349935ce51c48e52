"""A worker's timers: per-session deadlines and one-shot calls, on one heap.

Untrusted input: none (times come from the event loop's clock).

Deadlines move on nearly every read, so they are not re-queued on every move: an owner
keeps `deadline` (when it is really due) and `timer_at` (its earliest live heap entry).
A later deadline only updates the attribute; when the old entry comes up it is pushed
again for the new time. An earlier deadline gets an entry of its own, and the entries it
supersedes are skipped. So nothing ever scans all connections on an event.

A closed owner's entries are dead weight until they come up, which for an idle deadline
is minutes away; at thousands of connections a second that would hold every closed
session in memory. So `forget()` counts them, and once they may make up half the heap
it is rebuilt without them: O(n) now and then, O(1) per connection amortized.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Callable, Protocol


class Owner(Protocol):
    deadline: float
    timer_at: float
    closed: bool


class Timers:
    _MIN_PURGE = 1024  # do not rebuild small heaps: dead entries there cost little

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Any, Callable[[Any], None] | None]] = []
        self._seq = itertools.count()  # ties break by order of arrival, never by owner
        self._forgotten = 0  # owners closed since the last rebuild

    def __len__(self) -> int:
        return len(self._heap)

    def forget(self, owner: Owner) -> None:
        """`owner` was closed: its entries may go (call after setting `closed`)."""
        self._forgotten += 1
        heap = self._heap
        # An owner leaves one or two entries (idle and DATA deadlines): rebuild once the
        # forgotten could be half the heap. Each rebuild follows len/4 forgets, so the
        # cost per connection stays constant.
        if self._forgotten * 4 > len(heap) and len(heap) > self._MIN_PURGE:
            heap[:] = [entry for entry in heap if not entry[2].closed]
            heapq.heapify(heap)
            self._forgotten = 0

    def set_deadline(self, owner: Owner, when: float) -> None:
        owner.deadline = when
        if when < owner.timer_at:
            heapq.heappush(self._heap, (when, next(self._seq), owner, None))
            owner.timer_at = when

    def call_at(self, when: float, action: Callable[[Any], None], owner: Owner) -> None:
        """Run `action(owner)` at `when`, unless the owner is closed by then."""
        heapq.heappush(self._heap, (when, next(self._seq), owner, action))

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def expire(self, now: float, on_deadline: Callable[[Any], None]) -> None:
        """Run the calls that are due, and `on_deadline(owner)` for passed deadlines."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, owner, action = heapq.heappop(heap)
            if owner.closed:
                continue
            if action is not None:
                action(owner)
                continue
            if when != owner.timer_at:
                continue  # superseded by an earlier entry
            owner.timer_at = float("inf")
            if owner.deadline > now:
                self.set_deadline(owner, owner.deadline)  # it moved later meanwhile
            else:
                on_deadline(owner)
