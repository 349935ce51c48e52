"""Worker liveness stamps in shared memory: one float per worker slot, no syscall to beat.

The master creates the board before forking; workers write `time.monotonic()` into their
slot (CLOCK_MONOTONIC is the same clock in every process) and the master reads them.
"""

from __future__ import annotations

import mmap
import struct
import time

_SLOT = struct.Struct("d")


class HeartbeatBoard:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._map = mmap.mmap(-1, slots * _SLOT.size)  # anonymous, shared across fork

    def beat(self, slot: int, now: float | None = None) -> None:
        _SLOT.pack_into(self._map, slot * _SLOT.size, time.monotonic() if now is None else now)

    def last(self, slot: int) -> float:
        return _SLOT.unpack_from(self._map, slot * _SLOT.size)[0]

    def close(self) -> None:
        self._map.close()
