"""Worker liveness and load in shared memory: one small record per slot, no syscall to beat.

The master creates the board before forking; workers write `time.monotonic()` into their
slot (CLOCK_MONOTONIC is the same clock in every process) about once a second, with how
busy they were and whether they can take connections; the master reads the beats, and
the workers read each other's load to decide who accepts (accepting.py). A record torn by
a worker killed mid-write is harmless: the master only compares times, and a wrong load
figure shifts new connections for one second at most.
"""

from __future__ import annotations

import mmap
import struct
import time
from typing import NamedTuple

_SLOT = struct.Struct("=ddI")  # last beat, busy share of the last second, flags


class WorkerLoad(NamedTuple):
    slot: int
    beat: float  # time.monotonic() of the last beat
    busy: float  # CPU time over wall time in the last beat interval
    flags: int  # accepting.FULL, accepting.STOPPING


class HeartbeatBoard:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._map = mmap.mmap(-1, slots * _SLOT.size)  # anonymous, shared across fork

    def beat(self, slot: int, now: float | None = None, busy: float = 0.0,
             flags: int = 0) -> None:
        """Stamp `slot` as alive now (the master does so at spawn: a fresh record)."""
        _SLOT.pack_into(self._map, slot * _SLOT.size,
                        time.monotonic() if now is None else now, busy, flags)

    def last(self, slot: int) -> float:
        return _SLOT.unpack_from(self._map, slot * _SLOT.size)[0]

    def clear(self, slot: int) -> None:
        """The slot's worker is gone: it must not count as alive until a new one beats."""
        _SLOT.pack_into(self._map, slot * _SLOT.size, 0.0, 0.0, 0)

    def loads(self, since: float) -> list[WorkerLoad]:
        """Every slot that beat at or after `since`, in slot order."""
        return [WorkerLoad(slot, beat, busy, flags)
                for slot, (beat, busy, flags) in enumerate(_SLOT.iter_unpack(self._map))
                if beat and beat >= since]

    def close(self) -> None:
        self._map.close()
