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

The common case, a client the table knows, takes no lock and makes no system call:

- Active sessions are counted per worker slot (the heartbeat board's slots): each slot
  has a column of `capacity` counters that only its worker writes (one aligned 2-byte
  store). A client's total is its entry's counter summed over every slot handed out so
  far, one strided read. A worker raises its own counter first and then reads the total,
  and takes the raise back if that is over the limit: two workers racing for the last
  place may both refuse, never both admit. When a worker exits, however it died, the
  master zeroes its column (`vacate`): its sessions went with it.
- Per-minute counts live in the entries. A worker counts into `pending`, its own, and
  `flush`, at the end of a turn of its loop, adds that to the entries under the lock and
  stamps them seen. When a worker first counts for an entry after a flush, it reads the
  entry's estimates once, without a lock, and keeps them beside its counts: its checks
  add the two until its next flush. So one worker's own counts are exact, another
  worker's reach it at most two flushes later (theirs, then ours), and a worker killed
  by SIGKILL loses the counts of the turn it was in; the rest stay in shared memory. A
  rate is the sliding-window estimate many rate limiters use: this minute's count plus
  the previous minute's, weighted by how much of the last 60 seconds still lies in it.
  Kept from a flush to the next, the weight errs high, never low.

The lock serves taking an entry for a new client and `flush`: a POSIX record lock
(`fcntl.lockf`) on a memfd nobody else opens. The kernel drops it when its holder dies,
so a worker killed holding it stalls nobody. A worker never blocks on it for long: a new
client waits at most `lock_wait_s` and then goes uncounted; a flush that finds it taken
tries again the next turn.

Hazards. POSIX record locks belong to the process: closing any descriptor of the memfd
drops the lock (nothing does, and no other code opens it), and threads of one process do
not exclude each other (only the loop thread uses the table). Entries are read without
the lock, so a read racing a flush may see some fields before it and some after: the
checks then err by that flush until the reader's own next flush. A known client's entry
could be taken for another client between the moment a worker finds it and the moment
it raises its counter; the worker reads the key again after raising it and counts
nothing if it changed, which leaves only a window of a few bytecodes in which one
session is counted for the wrong client. A worker killed while writing an entry leaves
it unusable until it is evicted.
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
_ENTRY_BYTES = _ENTRY.size
_COUNTS = struct.Struct("=qQQQQ")  # from the minute on
_SEEN_COUNTS = struct.Struct("=dqQQQQ")  # from last seen on: what a flush writes
_KEY_BYTES = 16
# A window's keys, or keys and last-seen times, in one unpack: a new client's path, where
# a probe per entry in Python cost a slice and a comparison each.
_KEY = struct.Struct(f"={_KEY_BYTES}s")
_KEY_SEEN = struct.Struct(f"={_KEY_BYTES}sd")
_WINDOW_KEYS = struct.Struct("=" + f"{_KEY_BYTES}s{_ENTRY_BYTES - _KEY_BYTES}x" * WINDOW)
_WINDOW_KEYS_SEEN = struct.Struct(
    "=" + f"{_KEY_BYTES}sd{_ENTRY_BYTES - _KEY_SEEN.size}x" * WINDOW)
_COUNTS_AT = _KEY_BYTES + 8
_V4_MAPPED = bytes(10) + b"\xff\xff"
# A free entry's key. "::" is never a client, and the workers' keys for IPv6 networks
# carry a host bit (clientlimits.py), so that the network of ::1 is not this key either.
FREE_KEY = bytes(_KEY_BYTES)


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
        self._entries_end = _HEADER + capacity * _ENTRY_BYTES
        size = self._entries_end + slots * capacity * 2
        self._map = mmap.mmap(-1, size)  # anonymous, shared across fork; pages on first use
        whole = memoryview(self._map)
        self._span = whole[:8].cast("q")
        self._active = whole[self._entries_end:].cast("H")
        whole.release()
        self._lock_fd = _lock_file()
        # This process's counts not yet in the entries (index -> _start_pending's list);
        # true while some wait for `flush`. Each worker's own (the master's copy stays
        # empty), and the same dict for the process's life: the loop keeps a reference.
        self.pending: dict[int, list] = {}

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
        data, active = self._map, self._active
        index = hash(key) & self._mask  # most keys sit where they hash: look there first
        offset = _HEADER + index * _ENTRY_BYTES
        home = data[offset:offset + _KEY_BYTES]
        if home != key:
            # A free home entry means a new client: entries are never freed, and a key
            # takes the first free one of its window, so it would have taken this one.
            index = -1 if home == FREE_KEY else self._known(key)
            if index < 0:
                index = self._take(key, now)
                if index < 0:
                    return UNCOUNTED
            offset = _HEADER + index * _ENTRY_BYTES
        column = slot * self.capacity + index
        count = active[column]
        if count >= MAX_PER_SLOT:
            return UNCOUNTED
        active[column] = count + 1  # raised first, then checked: see the docstring
        if data[offset:offset + _KEY_BYTES] != key:  # taken for another client meanwhile
            active[column] = count
            return UNCOUNTED
        pending = self.pending.get(index)
        if pending is None or pending[0] != key:  # none yet, or the entry's former client's
            pending = self._start_pending(index, key, now)
        new = pending[1]
        pending[1] = new + 1
        if max_sessions and sum(
                active[index:self._span[0] * self.capacity:self.capacity]) > max_sessions:
            active[column] = count
            return TOO_MANY_SESSIONS
        if max_new_per_minute and new + pending[3] >= max_new_per_minute:
            active[column] = count
            return TOO_MANY_NEW
        return index

    def column(self, slot: int) -> tuple[memoryview, int]:
        """The active sessions' counters, and where `slot`'s column begins in them: a
        worker lowers its own as `close_session` does, without the call."""
        return self._active, slot * self.capacity

    def close_session(self, slot: int, index: int) -> None:
        """A session `open_session` counted has ended. No lock: the column is ours."""
        self._active[slot * self.capacity + index] -= 1

    def recipient(self, index: int, now: float, max_per_minute: int) -> bool:
        """Count a recipient of the client at `index` (one of its sessions is active, so
        the entry is its own); False when it is one too many this last minute. Counted
        refused or not."""
        pending = self.pending.get(index)
        if pending is None:
            offset = _HEADER + index * _ENTRY_BYTES
            pending = self._start_pending(index, self._map[offset:offset + _KEY_BYTES], now)
        rcpt = pending[2]
        pending[2] = rcpt + 1
        return rcpt + pending[4] < max_per_minute

    def flush(self, now: float, wait: bool = False) -> bool:
        """Add this process's pending counts to the entries, under the lock; False if the
        lock was taken (the counts wait for the next call). `wait`: as for a new client,
        wait for it at most `lock_wait_s` (a worker's last flush)."""
        if not self.pending:
            return True
        if not (self._lock() if wait else self._try_lock()):
            return False
        data = self._map
        this_minute = int(now // MINUTE_S)
        try:
            for index, (key, new_sessions, recipients, _, _) in self.pending.items():
                offset = _HEADER + index * _ENTRY_BYTES
                if data[offset:offset + _KEY_BYTES] != key:
                    continue  # evicted since: its counts went with it
                minute, new, new_before, rcpt, rcpt_before = _COUNTS.unpack_from(
                    data, offset + _COUNTS_AT)
                if minute < this_minute:
                    new, new_before, rcpt, rcpt_before = _roll(
                        minute, this_minute, new, new_before, rcpt, rcpt_before)
                    minute = this_minute
                # A minute ahead of ours (another worker's clock, read a moment after
                # ours) stays, and ours are added to it: never rolled back, which would
                # drop the counts it holds.
                _SEEN_COUNTS.pack_into(data, offset + _KEY_BYTES, now, minute,
                                       new + new_sessions, new_before, rcpt + recipients,
                                       rcpt_before)
        finally:
            self._unlock()
        self.pending.clear()
        return True

    # -- reading -------------------------------------------------------------------------

    def active(self, index: int) -> int:
        """Active sessions of the entry at `index`, over every slot handed out."""
        capacity = self.capacity
        return sum(self._active[index:self._span[0] * capacity:capacity])

    def lookup(self, key: bytes) -> int | None:
        """The entry index of `key`, or None (for tests and inspection)."""
        index = self._known(key)
        return None if index < 0 else index

    def counts(self, index: int, now: float) -> tuple[float, float]:
        """(new sessions, recipients) in the minute before `now`: the entry's as it
        stands, and this process's pending counts. The checks add the latter to the
        estimates read at their first count since the last flush instead."""
        new, rcpt = self._shared_estimates(index, now)
        pending = self.pending.get(index)
        if pending is not None:
            new += pending[1]
            rcpt += pending[2]
        return new, rcpt

    def close(self) -> None:
        self._span.release()
        self._active.release()
        self._map.close()
        os.close(self._lock_fd)

    # -- inside -------------------------------------------------------------------------

    def _known(self, key: bytes) -> int:
        """The entry holding `key`, or -1 (no lock: see the docstring's hazards)."""
        start = hash(key) & self._mask
        keys = self._window(start, _WINDOW_KEYS, _KEY)
        return (start + keys.index(key)) & self._mask if key in keys else -1

    def _take(self, key: bytes, now: float) -> int:
        """An entry for a new client, under the lock; -1 if none is free or the lock
        cannot be had."""
        if not self._lock():
            return -1
        try:
            start = hash(key) & self._mask
            home = _HEADER + start * _ENTRY_BYTES
            if self._map[home:home + _KEY_BYTES] == FREE_KEY:
                # Still free, under the lock: the key is nowhere else (see open_session),
                # and this is the first free entry of its window. A new client's usual case.
                free = start
            else:
                # Again, under the lock: another worker may have taken it meanwhile.
                window = self._window(start, _WINDOW_KEYS_SEEN, _KEY_SEEN)
                keys = window[0::2]
                if key in keys:
                    return (start + keys.index(key)) & self._mask
                if FREE_KEY in keys:
                    free = (start + keys.index(FREE_KEY)) & self._mask
                else:
                    free = self._evictable(start, window[1::2])
                    if free < 0:
                        return -1
            _ENTRY.pack_into(self._map, _HEADER + free * _ENTRY_BYTES, key, now,
                             int(now // MINUTE_S), 0, 0, 0, 0)
            # Nothing counted for the key yet, here or in the entry (the counts of the
            # client it held, if any, go with it).
            self.pending[free] = [key, 0, 0, 0, 0]
            return free
        finally:
            self._unlock()

    def _window(self, start: int, whole: struct.Struct, entry: struct.Struct) -> tuple:
        """The WINDOW entries from `start` unpacked by `whole`, flat, in probing order; by
        `entry`, entry by entry, where the window wraps around the table's end."""
        if start + WINDOW <= self.capacity:
            return whole.unpack_from(self._map, _HEADER + start * _ENTRY_BYTES)
        mask = self._mask
        return sum((entry.unpack_from(self._map, _HEADER + ((start + step) & mask)
                                      * _ENTRY_BYTES) for step in range(WINDOW)), ())

    def _shared_estimates(self, index: int, now: float) -> tuple[float, float]:
        """(new sessions, recipients) in the last minute, as the entry holds them."""
        minute, new, new_before, rcpt, rcpt_before = _COUNTS.unpack_from(
            self._map, _HEADER + index * _ENTRY_BYTES + _COUNTS_AT)
        this_minute = int(now // MINUTE_S)
        if minute != this_minute:
            new, new_before, rcpt, rcpt_before = _roll(
                minute, this_minute, new, new_before, rcpt, rcpt_before)
        weight = _weight(now)
        return new + new_before * weight, rcpt + rcpt_before * weight

    def _start_pending(self, index: int, key: bytes, now: float) -> list:
        """This process's counts for `key` at `index`, from none, with the entry's
        estimates as they stand (the module docstring says why they are kept):
        [key, new sessions, recipients, the entry's new sessions, its recipients]."""
        pending = self.pending[index] = [key, 0, 0, *self._shared_estimates(index, now)]
        return pending

    def _evictable(self, start: int, seen: tuple) -> int:
        """The least recently seen entry of the window from `start` without an active
        session, or -1; `seen`: the window's last-seen times, in probing order. Oldest
        first, so usually one entry's sessions are summed, not the window's."""
        for step in sorted(range(WINDOW), key=seen.__getitem__):
            index = (start + step) & self._mask
            if not self.active(index):
                return index
        return -1

    def _try_lock(self) -> bool:
        try:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False

    def _lock(self) -> bool:
        """Take the lock, waiting at most `lock_wait_s`; False if it could not be had."""
        if self._try_lock():
            return True
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
    """Counts kept for `minute`, seen from `this_minute`. Counts of a later minute
    (another worker's clock, read a moment after ours) are all this minute's: too many
    for a moment, never too few."""
    if minute > this_minute:
        return new + new_before, 0, rcpt + rcpt_before, 0
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
