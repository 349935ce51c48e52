"""Per-client counts shared by every worker, in the spirit of Postfix's anvil(8).

Untrusted input: the client address (the socket's peer, or the source a trusted PROXY
header names), used only as a 16-byte key. Where a key lands is Python's keyed hash of
it (SipHash, randomly seeded per start), so a client cannot aim at an entry; every worker
hashes alike because each is a fork of the master that made the table.

Theory of operation. The master makes the table before forking; every worker, and every
generation after a reload, shares it, and it never grows: `capacity` entries (a power of
two), each a client's key (IPv4 as IPv4-mapped IPv6), when it was last seen, the minute
its counts belong to, and its counts of new sessions and of recipients in that minute and
the one before. A key lives in one of WINDOW entries from its hash on (linear probing,
bounded); a new client takes a free one, or else the least recently seen one that has no
active session. When all WINDOW have one, the new client goes uncounted (UNCOUNTED).

Two kinds of count, two ways of sharing:

- Per-minute counts live in the entries and change only under a lock: a POSIX record lock
  (`fcntl.lockf`) on a memfd nobody else opens. The kernel drops such a lock when its
  holder dies, so a worker killed while holding it stalls nobody for long, and the
  counts stay in shared memory when the worker that made them dies. A rate is the
  sliding-window estimate many rate limiters use: this minute's count plus the previous
  minute's, weighted by how much of the last 60 seconds still lies in it.
- Active sessions are counted per worker slot (the heartbeat board's slots): each slot
  has a column of `capacity` counters that only its worker writes, without the lock
  (one aligned 2-byte store). A client's total is its entry's counter summed over every
  slot handed out so far, one strided read. When a worker exits, however it died, the
  master zeroes its column (`vacate`): its sessions went with it.

A session is counted (its column raised) only under the lock, so checking a total against
the limit and counting one more is atomic across workers. Lowering needs no lock: a total
that drops between another worker's read and its decision only errs towards refusing.

Hazards. POSIX record locks belong to the process: closing any descriptor of the memfd
drops the lock (nothing here does, and no other code opens it), and threads of one
process do not exclude each other (only the loop thread takes it). A worker stopped
while holding the lock (SIGSTOP, a debugger) would stall every other worker's new
connections, so a worker waits at most `lock_wait_s` and then lets the session through
uncounted rather than block its loop. A worker killed in the middle of writing an entry
leaves that entry's counts off by its one update, or the entry unusable until it is
evicted.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import struct
import tempfile
import time

WINDOW = 8  # entries probed per key
UNCOUNTED = -1  # open_session: let through, not counted (table busy or full)
TOO_MANY_SESSIONS = -2  # open_session: refused, too many active sessions
TOO_MANY_NEW = -3  # open_session: refused, too many new sessions in the last minute
MAX_PER_SLOT = 0xFFFF  # a column's counters are 16 bits
MINUTE_S = 60.0

_HEADER = 64  # bytes before the entries: the span (slots handed out so far)
# key, last seen (monotonic s), minute number, new sessions: this minute, the previous
# one; recipients: this minute, the previous one. 64 bytes, so entries align to cache lines.
_ENTRY = struct.Struct("=16sdqQQQQ")
_STAMPED = struct.Struct("=dqQQQQ")  # the same without the key
_SEEN = struct.Struct("=d")
_KEY_BYTES = 16
_V4_MAPPED = bytes(10) + b"\xff\xff"
_EMPTY = bytes(_KEY_BYTES)  # "::" is never a client: a free entry


def client_key(address: str) -> bytes | None:
    """The 16-byte key of an address as the socket module or the PROXY parser writes it
    (IPv4 as IPv4-mapped IPv6, so one client is one key on a dual-stack listener); None
    for text that is no address."""
    try:
        if ":" in address:
            return socket.inet_pton(socket.AF_INET6, address.partition("%")[0])
        return _V4_MAPPED + socket.inet_pton(socket.AF_INET, address)
    except (OSError, ValueError):
        return None


class ClientTable:
    """The shared table; see the module docstring. Made by the master before fork."""

    def __init__(self, capacity: int, slots: int, lock_wait_s: float = 0.01) -> None:
        if capacity < WINDOW or capacity & (capacity - 1):
            raise ValueError(f"capacity must be a power of two >= {WINDOW}, got {capacity}")
        self.capacity = capacity
        self.slots = slots
        self.lock_wait_s = lock_wait_s
        self._mask = capacity - 1
        self._entries_end = _HEADER + capacity * _ENTRY.size
        size = self._entries_end + slots * capacity * 2
        self._map = mmap.mmap(-1, size)  # anonymous, shared across fork; pages on first use
        whole = memoryview(self._map)
        self._span = whole[:8].cast("q")
        self._active = whole[self._entries_end:].cast("H")
        whole.release()
        self._lock_fd = _lock_file()

    # -- the master ---------------------------------------------------------------------

    def hand_out(self, slot: int) -> None:
        """`slot` is given to a new worker: include it in the sums from now on."""
        if slot >= self._span[0]:
            self._span[0] = slot + 1

    def vacate(self, slot: int) -> None:
        """The slot's worker has exited: its sessions are gone. Before the slot is reused."""
        start = self._entries_end + slot * self.capacity * 2
        self._map[start:start + self.capacity * 2] = bytes(self.capacity * 2)

    # -- the workers ---------------------------------------------------------------------

    def open_session(self, slot: int, key: bytes, now: float, max_sessions: int,
                     max_new_per_minute: int) -> int:
        """Count a new session of `key` in `slot`'s column, if the limits (0: none) allow:
        its entry index (give it back with `close_session`), or UNCOUNTED, or the refusal
        TOO_MANY_SESSIONS or TOO_MANY_NEW. Every call counts as a new session, refused
        or not (connection attempts, as Postfix counts them)."""
        if not self._lock():
            return UNCOUNTED
        try:
            index = self._find(key, now)
            if index < 0:
                return UNCOUNTED
            offset = _HEADER + index * _ENTRY.size + _KEY_BYTES
            _, minute, new, new_before, rcpt, rcpt_before = _STAMPED.unpack_from(
                self._map, offset)
            this_minute = int(now // MINUTE_S)
            if minute != this_minute:
                new, new_before, rcpt, rcpt_before = _roll(
                    minute, this_minute, new, new_before, rcpt, rcpt_before)
            _STAMPED.pack_into(self._map, offset, now, this_minute, new + 1, new_before,
                               rcpt, rcpt_before)
            if max_sessions and self.active(index) >= max_sessions:
                return TOO_MANY_SESSIONS
            if max_new_per_minute and new + new_before * _weight(now) >= max_new_per_minute:
                return TOO_MANY_NEW
            column = slot * self.capacity + index
            count = self._active[column]
            if count >= MAX_PER_SLOT:
                return UNCOUNTED
            self._active[column] = count + 1
            return index
        finally:
            self._unlock()

    def close_session(self, slot: int, index: int) -> None:
        """A session `open_session` counted has ended. No lock: the column is ours."""
        column = slot * self.capacity + index
        self._active[column] -= 1

    def recipient(self, index: int, now: float, max_per_minute: int) -> bool:
        """Count a recipient of the client at `index` (one of its sessions is active, so
        the entry is its own); False when it is one too many this last minute. Counted
        refused or not. True, uncounted, if the lock cannot be had."""
        if not self._lock():
            return True
        try:
            offset = _HEADER + index * _ENTRY.size + _KEY_BYTES
            _, minute, new, new_before, rcpt, rcpt_before = _STAMPED.unpack_from(
                self._map, offset)
            this_minute = int(now // MINUTE_S)
            if minute != this_minute:
                new, new_before, rcpt, rcpt_before = _roll(
                    minute, this_minute, new, new_before, rcpt, rcpt_before)
            _STAMPED.pack_into(self._map, offset, now, this_minute, new, new_before,
                               rcpt + 1, rcpt_before)
            return rcpt + rcpt_before * _weight(now) < max_per_minute
        finally:
            self._unlock()

    # -- reading -------------------------------------------------------------------------

    def active(self, index: int) -> int:
        """Active sessions of the entry at `index`, over every slot handed out."""
        capacity = self.capacity
        return sum(self._active[index:self._span[0] * capacity:capacity])

    def lookup(self, key: bytes) -> int | None:
        """The entry index of `key`, or None (no lock: for tests and inspection)."""
        for index in self._window(key):
            offset = _HEADER + index * _ENTRY.size
            if self._map[offset:offset + _KEY_BYTES] == key:
                return index
        return None

    def counts(self, index: int, now: float) -> tuple[float, float]:
        """(new sessions, recipients) in the minute before `now`, as the limits see them."""
        _, minute, new, new_before, rcpt, rcpt_before = _STAMPED.unpack_from(
            self._map, _HEADER + index * _ENTRY.size + _KEY_BYTES)
        this_minute = int(now // MINUTE_S)
        if minute != this_minute:
            new, new_before, rcpt, rcpt_before = _roll(
                minute, this_minute, new, new_before, rcpt, rcpt_before)
        weight = _weight(now)
        return new + new_before * weight, rcpt + rcpt_before * weight

    def close(self) -> None:
        self._span.release()
        self._active.release()
        self._map.close()
        os.close(self._lock_fd)

    # -- inside -------------------------------------------------------------------------

    def _window(self, key: bytes) -> list[int]:
        start, mask = hash(key), self._mask
        return [(start + step) & mask for step in range(WINDOW)]

    def _find(self, key: bytes, now: float) -> int:
        """The entry of `key`, taken for it if need be (under the lock); -1: none free."""
        data = self._map
        start, mask = hash(key), self._mask
        free = -1
        for step in range(WINDOW):
            index = (start + step) & mask
            offset = _HEADER + index * _ENTRY.size
            held = data[offset:offset + _KEY_BYTES]
            if held == key:
                return index
            if free < 0 and held == _EMPTY:
                free = index
        if free < 0:
            free = self._evictable(start)
            if free < 0:
                return -1
        _ENTRY.pack_into(data, _HEADER + free * _ENTRY.size, key, now, int(now // MINUTE_S),
                         0, 0, 0, 0)
        return free

    def _evictable(self, start: int) -> int:
        """The least recently seen entry of the window without an active session, or -1."""
        best, best_seen = -1, 0.0
        for step in range(WINDOW):
            index = (start + step) & self._mask
            seen = _SEEN.unpack_from(self._map, _HEADER + index * _ENTRY.size + _KEY_BYTES)[0]
            if (best < 0 or seen < best_seen) and not self.active(index):
                best, best_seen = index, seen
        return best

    def _lock(self) -> bool:
        """Take the lock, waiting at most `lock_wait_s`; False if it could not be had."""
        try:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            pass
        deadline = time.monotonic() + self.lock_wait_s
        while True:
            os.sched_yield()  # the holder keeps it for microseconds
            try:
                fcntl.lockf(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False

    def _unlock(self) -> None:
        fcntl.lockf(self._lock_fd, fcntl.LOCK_UN)


def _roll(minute: int, this_minute: int, new: int, new_before: int, rcpt: int,
          rcpt_before: int) -> tuple[int, int, int, int]:
    """Counts kept for `minute`, seen from `this_minute`."""
    if minute == this_minute - 1:
        return 0, new, 0, rcpt
    return 0, 0, 0, 0


def _weight(now: float) -> float:
    """How much of the previous minute lies within the 60 seconds before `now`."""
    return 1.0 - (now % MINUTE_S) / MINUTE_S


def _lock_file() -> int:
    """A descriptor only this table uses, to hang the lock on: a memfd, or an unlinked
    temporary file where there is none. Inherited across fork; the locks are not."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        try:
            return memfd_create("minismtp-anvil", getattr(os, "MFD_CLOEXEC", 0))
        except OSError:
            pass
    fd, path = tempfile.mkstemp(prefix="minismtp-anvil-")
    os.unlink(path)
    return fd
