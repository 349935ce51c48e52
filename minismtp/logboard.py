"""Log lines a worker has made but not yet written, kept where its master can read them.

Writing a worker's per-message lines at the end of every loop turn cost a system call
a turn, and writing them later from the worker's own memory would lose them to a
SIGKILL. So each line, as it is made, is copied into the worker's slot of a shared
anonymous mapping the master made before forking, and the slot is written out in
batches (msglog.py says when). When a worker dies without writing its slot out
(SIGKILL, a crash), the master writes what the slot still holds before it reports the
death: a worker killed with SIGKILL loses only a line it was still making.

Untrusted input: none; the lines were formatted (and escaped) by msglog.py.

Per slot, three 64-bit counts, then SLOT_BYTES of encoded whole lines: `held`, the bytes
of lines in the slot, `written`, how many of those are out, and `dropped`, the lines that
found the slot full while the log stream took nothing (logstream.py), not yet reported. The
worker moves `written` after each write, so a worker killed while writing out has only
the rest written by the master; one killed between a write and its count (a few
instructions) has that piece written twice, which is the one way a line can repeat. A
stream that takes part of a piece moves `written` to the middle of a line, and the rest
of that line is the next piece. A line that finds no room after `held` makes the lines
not yet out move to the front, over those written (LogSlot._move_to_front says in what
order, so that a SIGKILL there loses nothing). A slot has one writer, the thread of its
worker's loop; nothing here takes a lock.
"""

from __future__ import annotations

import mmap
import os
import select
from typing import Protocol

SLOT_BYTES = 32 * 1024  # lines held per worker: a few hundred
ATOMIC_BYTES = getattr(select, "PIPE_BUF", 4096)  # a pipe write up to this is never split
_COUNTS = 24  # `held`, `written` and `dropped`, 64 bits each
_STRIDE = _COUNTS + SLOT_BYTES


class Writer(Protocol):
    def write(self, data: bytes) -> int:
        """Write what the stream takes of `data` now; return how much (0: nothing)."""


class LogSlot:
    """One worker's part of the board: lines in, whole-line pieces out."""

    __slots__ = ("_map", "_data", "_counts", "_base", "in_line")

    def __init__(self, whole: mmap.mmap, slot: int) -> None:
        self._map = whole
        self._base = base = slot * _STRIDE + _COUNTS  # where the slot's lines start
        view = memoryview(whole)
        self._counts = view[base - _COUNTS: base].cast("q")
        self._data = view[base: base + SLOT_BYTES]
        view.release()
        # Whether the stream took part of a line: its rest must go before anything else
        # (logstream.LogHandler holds other records meanwhile). This process's to know.
        self.in_line = False

    @property
    def held(self) -> int:
        return self._counts[0]

    @property
    def dropped(self) -> int:
        """Lines dropped for want of room (the stream stalled) and not yet reported."""
        return self._counts[2]

    @dropped.setter
    def dropped(self, count: int) -> None:
        self._counts[2] = count

    @property
    def waiting(self) -> int:
        """Bytes held and not written out yet."""
        counts = self._counts
        return counts[0] - counts[1]

    def add(self, data: bytes) -> bool:
        """Keep `data` (whole lines) after what the slot holds; False if it does not fit."""
        held = self._counts[0]
        end = held + len(data)
        if end > SLOT_BYTES:
            if not self._move_to_front():
                return False
            held = self._counts[0]
            end = held + len(data)
            if end > SLOT_BYTES:
                return False
        self._data[held:end] = data
        self._counts[0] = end  # after the copy: a SIGKILL between leaves the line out
        return True

    def _move_to_front(self) -> bool:
        """Make room: the lines not yet out move to the start of the slot, over lines that
        are. Only when they are fewer bytes than those, so that the copy leaves them where
        they were too; a slot refuses lines, then, only while half or more of it waits.

        The master writes what lies between `written` and `held` after a SIGKILL at any
        instruction here, so the order is: (1) copy, the counts untouched: [written:held]
        is as it was; (2) `held` to the length moved: `written` > `held` > 0, a state no
        other step makes, which `settle()` (the master's) reads as "the first `held`
        bytes", the copy; (3) `written` to 0: the slot as it now is. Nothing is lost,
        repeated or cut; a line written in part has its rest moved, as any other."""
        counts = self._counts
        held, written = counts[0], counts[1]
        waiting = held - written
        if not 0 < waiting < written:
            return False
        self._data[:waiting] = self._data[written:held]
        counts[0] = waiting
        counts[1] = 0
        return True

    def settle(self) -> None:
        """After the worker died: finish a move to the front it was cut in (above)."""
        counts = self._counts
        if counts[1] > counts[0] > 0:
            counts[1] = 0

    def next_piece(self) -> bytes:
        """The next lines to write, from the first not written: as many whole lines as
        fit in ATOMIC_BYTES (one longer line alone). Empty when all are out."""
        counts = self._counts
        start, end = self._base + counts[1], self._base + counts[0]
        return self._map[start:cut(self._map, start, end)]

    def mark_written(self, size: int) -> None:
        counts = self._counts
        counts[1] += size
        if counts[1] == counts[0]:
            counts[0] = counts[1] = 0  # empty again: `written` first would repeat lines
            self.in_line = False
        else:
            self.in_line = self._data[counts[1] - 1] != 10  # not after a newline

    def finish_line(self, out: Writer) -> bool:
        """Write the rest of a line the stream took in part; True once none is left."""
        while self.in_line:
            counts = self._counts
            start, end = self._base + counts[1], self._base + counts[0]
            stop = self._map.find(b"\n", start, end) + 1 or end
            written = out.write(self._map[start:stop])
            if not written:
                return False
            self.mark_written(written)
        return True

    def write_out(self, out: int | Writer) -> int:
        """Write what is held and not yet out, piece by piece; return the bytes written.
        `out`: a descriptor, written until all is out (a file, a test), or a stream that
        takes what it can without waiting (logstream.py): the rest stays held."""
        if isinstance(out, int):
            out = _Blocking(out)
        total = 0
        while piece := self.next_piece():
            written = out.write(piece)
            if not written:
                break  # the stream takes no more now
            self.mark_written(written)  # part of a piece: its rest is the next piece
            total += written
        return total

    def take(self) -> tuple[bytes, int]:
        """What is held and not yet out, and the count of lines dropped: no longer held."""
        self.settle()
        counts = self._counts
        left = self._map[self._base + counts[1]: self._base + counts[0]], counts[2]
        self.clear()
        return left

    def clear(self) -> None:
        self._counts[0] = self._counts[1] = self._counts[2] = 0
        self.in_line = False

    def release(self) -> None:
        self._counts.release()
        self._data.release()


class LogBoard:
    """Every worker slot's held lines; made by the master before it forks (arbiter.py)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._map = mmap.mmap(-1, _STRIDE * slots)  # anonymous, shared across fork
        self._slots: dict[int, LogSlot] = {}

    def slot(self, slot: int) -> LogSlot:
        if slot not in self._slots:
            self._slots[slot] = LogSlot(self._map, slot)
        return self._slots[slot]

    def hand_out(self, slot: int) -> None:
        """The master gives `slot` to a new worker: it starts empty."""
        self.slot(slot).clear()

    def recover(self, slot: int, fd: int) -> int:
        """After the slot's worker exited: write out what it left (nothing, after a clean
        stop); return the bytes written."""
        left = self.slot(slot)
        left.settle()
        try:
            return left.write_out(fd)
        finally:
            left.clear()

    def take(self, slot: int) -> tuple[bytes, int]:
        """After the slot's worker exited: what it left, for the master to write, and
        how many lines it dropped without saying so yet."""
        return self.slot(slot).take()

    def close(self) -> None:
        for slot in self._slots.values():
            slot.release()
        self._slots.clear()
        self._map.close()


def write_lines(fd: int, data: bytes) -> None:
    """Write `data` (whole lines) in pieces of whole lines, each at most ATOMIC_BYTES, so
    that lines of several processes sharing a pipe never interleave mid-line."""
    start, end = 0, len(data)
    if end <= ATOMIC_BYTES:  # a turn's usual few lines: one write, no slicing
        write_all(fd, data)
        return
    while start < end:
        stop = cut(data, start, end)
        write_all(fd, data[start:stop])
        start = stop


def write_all(fd: int, data: bytes) -> None:
    try:
        written = os.write(fd, data)
        while written < len(data):  # a full pipe or disk: the rest, as it goes
            data = data[written:]
            written = os.write(fd, data)
    except OSError:
        pass  # like logging's handlers: a log that cannot be written never stops mail


class _Blocking:
    """A descriptor written until all is out, as a Writer."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes) -> int:
        write_all(self.fd, data)
        return len(data)


def cut(buffer: bytes | bytearray | mmap.mmap, start: int, end: int) -> int:
    """Where the piece of whole lines starting at `start` ends: at most ATOMIC_BYTES on,
    or after one longer line."""
    if end - start <= ATOMIC_BYTES:
        return end
    cut = buffer.rfind(b"\n", start, start + ATOMIC_BYTES)
    if cut < 0:
        cut = buffer.find(b"\n", start, end)
    return cut + 1 if cut >= 0 else end
