"""Worker liveness and load in shared memory: no syscall to beat or to count.

The master creates the board before forking. Per worker slot, the worker writes
`time.monotonic()` (CLOCK_MONOTONIC is the same clock in every process) and the number of
sessions it holds, or NOT_ACCEPTING while it takes no new connections (starting, out of
descriptors, leaving a burst to its siblings, stopping). The master reads the beats;
workers read each other's loads to share one listening queue evenly (balance.py). The
master keeps `span` above every slot it has handed out, so a worker looks at a few
slots, not at all of them.
"""

from __future__ import annotations

import mmap
import time

NOT_ACCEPTING = -1
_DOUBLE = 8  # bytes per slot in each array: a double beat, a 64-bit load


class HeartbeatBoard:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._map = mmap.mmap(-1, _DOUBLE * (2 * slots + 1))  # anonymous, shared across fork
        whole = memoryview(self._map)
        self._beats = whole[: _DOUBLE * slots].cast("d")
        self.loads = whole[_DOUBLE * slots: 2 * _DOUBLE * slots].cast("q")
        self._span = whole[2 * _DOUBLE * slots:].cast("q")
        whole.release()
        for slot in range(slots):
            self.loads[slot] = NOT_ACCEPTING

    def beat(self, slot: int, now: float | None = None) -> None:
        self._beats[slot] = time.monotonic() if now is None else now

    def last(self, slot: int) -> float:
        return self._beats[slot]

    def hand_out(self, slot: int, now: float) -> None:
        """The master gives `slot` to a new worker: alive from `now`, not accepting yet."""
        self._beats[slot] = now
        self.loads[slot] = NOT_ACCEPTING
        if slot >= self._span[0]:
            self._span[0] = slot + 1

    def vacate(self, slot: int) -> None:
        """The slot's worker has exited."""
        self.loads[slot] = NOT_ACCEPTING

    def siblings(self, slot: int, now: float, max_age: float) -> tuple[int | None, int, int]:
        """Other live, accepting workers: (fewest sessions held or None, sessions, count)."""
        loads, beats = self.loads, self._beats
        lightest, total, count = None, 0, 0
        for other in range(self._span[0]):
            load = loads[other]
            if load < 0 or other == slot or now - beats[other] > max_age:
                continue
            total += load
            count += 1
            if lightest is None or load < lightest:
                lightest = load
        return lightest, total, count

    def close(self) -> None:
        for view in (self._beats, self.loads, self._span):
            view.release()
        self._map.close()
