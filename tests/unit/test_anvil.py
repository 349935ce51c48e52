"""The per-client table (anvil.py): keys, counts, the sliding minute, eviction, the lock,
and a dead worker's slot. The clock is always injected; forking is real."""

from __future__ import annotations

import os
import random
import signal
import struct
import time

import pytest

from minismtp import anvil
from minismtp.anvil import (
    TOO_MANY_NEW, TOO_MANY_SESSIONS, UNCOUNTED, WINDOW, ClientTable, client_key,
)

T0 = 60.0 * 1000  # the start of a minute, as a monotonic clock reads
A = client_key("192.0.2.1")
B = client_key("192.0.2.2")


@pytest.fixture
def table():
    table = ClientTable(1024, 4)
    for slot in range(2):
        table.hand_out(slot)
    yield table
    table.close()


def test_keys_are_16_bytes_ipv4_mapped():
    assert client_key("192.0.2.1") == bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 1])
    assert client_key("::ffff:192.0.2.1") == client_key("192.0.2.1")  # dual-stack socket
    assert client_key("2001:db8::1") == bytes.fromhex("20010db8" + "00" * 11 + "01")
    assert client_key("fe80::1%eth0") == client_key("fe80::1")
    assert client_key("2001:db8::1") != client_key("2001:db8::2")
    for bad in ("", "example.org", "1.2.3", "::g"):
        assert client_key(bad) is None


def test_capacity_is_a_power_of_two():
    for bad in (0, WINDOW - 1, 1000):
        with pytest.raises(ValueError):
            ClientTable(bad, 1)


def test_a_session_over_the_limit_takes_its_count_back(table):
    held = table.open_session(0, A, T0, 1, 0)
    table._active[1 * 1024 + held] = 1  # another worker has raised its own, racing us
    assert table.open_session(0, A, T0, 1, 0) == TOO_MANY_SESSIONS
    assert table._active[held] == 1


def test_an_entry_taken_for_another_client_is_not_counted_into(table):
    index = table.open_session(0, A, T0, 0, 0)
    table.close_session(0, index)
    table._known = lambda key: index  # found just before another worker took the entry
    table._map[64 + index * 64:64 + index * 64 + 16] = B
    assert table.open_session(0, A, T0, 0, 0) == UNCOUNTED
    assert table.active(index) == 0


def test_sessions_are_counted_across_slots_and_released(table):
    first = table.open_session(0, A, T0, 3, 0)
    assert first >= 0
    assert table.open_session(1, A, T0, 3, 0) == first
    assert table.open_session(0, A, T0, 3, 0) == first
    assert table.active(first) == 3
    assert table.open_session(1, A, T0, 3, 0) == TOO_MANY_SESSIONS
    assert table.active(first) == 3  # a refused session holds nothing
    assert table.open_session(0, B, T0, 3, 0) >= 0  # another client, its own count
    table.close_session(1, first)
    assert table.active(first) == 2
    assert table.open_session(1, A, T0, 3, 0) == first
    assert table.lookup(A) == first and table.lookup(client_key("192.0.2.9")) is None


def test_slots_not_handed_out_are_not_summed():
    table = ClientTable(1024, 4)
    table.hand_out(0)
    index = table.open_session(0, A, T0, 0, 0)
    table._active[3 * 1024 + index] = 7  # noise beyond the span
    assert table.active(index) == 1
    table.hand_out(3)
    assert table.active(index) == 8
    table.close()


def test_a_slot_handed_out_later_counts_towards_the_session_limit():
    table = ClientTable(1024, 4)
    table.hand_out(0)
    index = table.open_session(0, A, T0, 2, 0)  # 1 of 2, summed over slot 0 alone
    assert table.open_session(0, A, T0, 2, 0) == index
    table.close_session(0, index)
    table.hand_out(3)
    table.open_session(3, A, T0, 2, 0)  # the new slot's session: 2 of 2
    assert table.open_session(0, A, T0, 2, 0) == TOO_MANY_SESSIONS
    assert table.active(index) == 2
    table.close()


def test_new_sessions_per_minute_slide_out(table):
    for _ in range(5):
        index = table.open_session(0, A, T0 + 10, 0, 5)
        assert index >= 0
        table.close_session(0, index)
    assert table.open_session(0, A, T0 + 20, 0, 5) == TOO_MANY_NEW  # the 6th attempt
    assert table.counts(table.lookup(A), T0 + 20)[0] == 6
    assert table.flush(T0 + 20)  # as a worker does at the end of each turn
    assert table.counts(table.lookup(A), T0 + 20)[0] == 6
    # A minute on, all of the last one still weighs in (6 * 1.0)...
    assert table.open_session(0, A, T0 + 60, 0, 5) == TOO_MANY_NEW
    assert table.flush(T0 + 60)
    # ...at its middle, half of it: 6 attempts * 0.5, and the 1 made in this minute.
    assert table.counts(table.lookup(A), T0 + 90) == (1 + 3.0, 0)
    assert table.open_session(0, A, T0 + 90, 0, 5) >= 0
    assert table.flush(T0 + 90)
    # Two minutes on, nothing is left of either.
    assert table.counts(table.lookup(A), T0 + 180) == (0, 0)
    assert table.open_session(0, A, T0 + 180, 0, 1) >= 0


def test_refused_attempts_count_towards_the_rate(table):
    held = [table.open_session(0, A, T0, 2, 0) for _ in range(2)]
    assert table.open_session(0, A, T0, 2, 0) == TOO_MANY_SESSIONS
    assert table.counts(held[0], T0)[0] == 3


def test_another_worker_s_counts_are_seen_after_our_next_flush(table):
    """A worker reads an entry's estimates when it first counts for it after a flush,
    and adds its own counts to them until its next flush: another worker's flushed
    counts reach its checks then."""
    assert table.open_session(0, A, T0, 0, 3) >= 0
    ours, table.pending = table.pending, {}  # another worker's turn, in slot 1
    assert table.open_session(1, A, T0, 0, 3) >= 0
    assert table.open_session(1, A, T0, 0, 3) >= 0
    assert table.flush(T0)  # theirs: 2 in the entry
    table.pending = ours
    assert table.counts(table.lookup(A), T0) == (3, 0)  # as the entry and ours add up
    assert table.open_session(0, A, T0 + 1, 0, 3) >= 0  # checked as 0 + 1: let through
    assert table.flush(T0 + 1)
    assert table.open_session(0, A, T0 + 2, 0, 3) == TOO_MANY_NEW  # 4 now
    assert table.counts(table.lookup(A), T0 + 2) == (5, 0)


def test_counts_of_a_minute_ahead_of_our_clock_are_kept(table):
    """Workers read their clocks at different moments: one flushes in the next minute
    just before another flushes what it counted in this one. Those are not rolled back
    (which would drop them), and ours are added to them; a reader still in the earlier
    minute counts them all as its own minute's."""
    index = table.open_session(0, A, T0 + 59.999, 0, 0)
    ours, table.pending = table.pending, {}  # another worker, its clock a moment later
    for _ in range(3):
        table.open_session(1, A, T0 + 60.001, 0, 0)
        table.recipient(index, T0 + 60.001, 100)
    assert table.flush(T0 + 60.001)
    assert table.counts(index, T0 + 59.999) == (3, 3)  # read from the minute before
    table.pending = ours
    assert table.flush(T0 + 59.999)
    assert table.counts(index, T0 + 60.002) == (4, 3)
    assert table.open_session(0, A, T0 + 60.002, 0, 5) >= 0
    assert table.open_session(0, A, T0 + 60.002, 0, 5) == TOO_MANY_NEW  # 5 before it


def test_recipients_per_minute(table):
    index = table.open_session(0, A, T0, 0, 0)
    assert [table.recipient(index, T0 + 1, 3) for _ in range(5)] == [True] * 3 + [False] * 2
    assert table.counts(index, T0 + 1) == (1, 5)
    assert table.flush(T0 + 1)
    # Half a minute on: 5 * 0.5 = 2.5 < 3 lets one through; then 1 + 2.5 does not.
    assert table.recipient(index, T0 + 90, 3) is True
    assert table.recipient(index, T0 + 90, 3) is False
    assert table.counts(index, T0 + 90) == (0 + 0.5, 2 + 2.5)
    assert table.flush(T0 + 90)
    assert table.counts(index, T0 + 90) == (0 + 0.5, 2 + 2.5)
    assert table.recipient(index, T0 + 180, 1) is True  # two minutes on: forgotten


def test_a_full_window_forgets_the_least_recently_seen_idle_client():
    table = ClientTable(WINDOW, 2)  # one window: every key lands in it
    table.hand_out(0)
    keys = [client_key(f"198.51.100.{n}") for n in range(WINDOW + 2)]
    held = {}
    for n, key in enumerate(keys[:WINDOW]):
        held[n] = table.open_session(0, key, T0 + n, 0, 0)
    assert sorted(held.values()) == list(range(WINDOW))
    for n in (2, 5):  # idle now; 2 was seen before 5
        table.close_session(0, held[n])
    newcomer = table.open_session(0, keys[WINDOW], T0 + 20, 0, 0)
    assert newcomer == held[2] and table.lookup(keys[2]) is None
    assert table.counts(newcomer, T0 + 20) == (1, 0)  # nothing inherited
    assert table.open_session(0, keys[WINDOW + 1], T0 + 21, 0, 0) == held[5]
    # Every entry has an open session now: the next new client goes uncounted.
    assert table.open_session(0, client_key("203.0.113.1"), T0 + 22, 0, 0) == UNCOUNTED
    assert table.open_session(0, keys[0], T0 + 22, 0, 0) == held[0]  # known ones still are
    table.close()


def test_a_client_counted_again_is_seen_when_its_counts_are_flushed():
    """Last seen is stamped by `flush`, once a turn, for the entries counted since: a
    client back after the others is evicted after them, once its worker has flushed."""
    table = ClientTable(WINDOW, 2)
    table.hand_out(0)
    keys = [client_key(f"198.51.100.{n}") for n in range(WINDOW + 2)]
    held = []
    for n, key in enumerate(keys[:WINDOW]):  # a turn each: seen at T0 + n
        held.append(table.open_session(0, key, T0 + n, 0, 0))
        assert table.flush(T0 + n)
    for index in held:
        table.close_session(0, index)
    table.close_session(0, table.open_session(0, keys[0], T0 + 30, 0, 0))
    # Not flushed yet: keys[0] still reads as seen first, and goes first.
    assert table.open_session(0, keys[WINDOW], T0 + 31, 0, 0) == held[0]
    table.close_session(0, held[0])
    assert table.open_session(0, keys[1], T0 + 32, 0, 0) == held[1]
    table.close_session(0, held[1])
    assert table.flush(T0 + 32)  # keys[1] and the newcomer seen now
    assert table.open_session(0, keys[WINDOW + 1], T0 + 33, 0, 0) == held[2]
    assert table.lookup(keys[1]) == held[1] and table.lookup(keys[2]) is None
    table.close()


def keys_homed_at(table: ClientTable, home: int, count: int) -> list[bytes]:
    """`count` client keys whose window starts at entry `home` (hashes are seeded per
    process, so they are searched for)."""
    keys = []
    for n in range(1 << 20):
        key = client_key(f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}")
        if hash(key) & (table.capacity - 1) == home:
            keys.append(key)
            if len(keys) == count:
                return keys
    raise AssertionError("no keys found")


@pytest.mark.parametrize("capacity, home", [
    (2 * WINDOW, 2 * WINDOW - 2),  # wraps after two entries
    (2 * WINDOW, 2 * WINDOW - 1),  # wraps after one
    (2 * WINDOW, WINDOW),          # the last window that does not wrap
    (WINDOW, 0),                   # the whole table, not wrapping
    (WINDOW, 3),                   # the whole table, wrapping
])
def test_windows_at_and_around_the_table_end(capacity, home):
    """Keys whose window starts at `home` take its entries in probing order, wrapping
    past the table's end; each is found again; a full window of active clients leaves
    a newcomer uncounted; the least recently seen idle entry is the one evicted."""
    table = ClientTable(capacity, 2)
    table.hand_out(0)
    keys = keys_homed_at(table, home, WINDOW + 2)
    held = [table.open_session(0, key, T0 + n, 0, 0) for n, key in enumerate(keys[:WINDOW])]
    assert held == [(home + step) % capacity for step in range(WINDOW)]
    assert [table.lookup(key) for key in keys[:WINDOW]] == held
    assert table.open_session(0, keys[WINDOW], T0 + 10, 0, 0) == UNCOUNTED  # all active
    for n in (4, 1):  # idle now, 1 seen before 4: 1 goes first
        table.close_session(0, held[n])
    assert table.open_session(0, keys[WINDOW], T0 + 11, 0, 0) == held[1]
    assert table.open_session(0, keys[WINDOW + 1], T0 + 12, 0, 0) == held[4]
    assert table.lookup(keys[1]) is None and table.lookup(keys[4]) is None
    table.close()


def test_of_idle_entries_seen_at_the_same_time_the_first_probed_is_evicted():
    table = ClientTable(WINDOW, 2)
    table.hand_out(0)
    keys = keys_homed_at(table, 2, WINDOW + 1)
    held = [table.open_session(0, key, T0 + n, 0, 0) for n, key in enumerate(keys[:WINDOW])]
    for n in (6, 3):  # two entries last seen at the same time, both idle
        table._map[64 + held[n] * 64 + 16:64 + held[n] * 64 + 24] = struct.pack("=d", T0 - 5)
        table.close_session(0, held[n])
    assert table.open_session(0, keys[WINDOW], T0 + 20, 0, 0) == held[3]  # probed first
    table.close()


def test_a_key_inside_another_entry_s_fields_is_not_taken_for_its_entry(table):
    """The window is searched as bytes: the key's bytes elsewhere in an entry (its
    counts, say) are not that entry's key; the real entry further on is found."""
    home = 5
    first, second = keys_homed_at(table, home, 2)
    index = table.open_session(0, first, T0, 0, 0)
    assert index == home
    at = 64 + home * 64 + 20  # within the first entry, past its key
    table._map[at:at + 16] = second
    assert table.lookup(second) is None
    assert table.open_session(0, second, T0, 0, 0) == home + 1
    assert table.lookup(second) == home + 1


def test_counts_pending_for_an_entry_taken_since_are_not_inherited(table):
    index = table.open_session(0, A, T0, 0, 0)
    table.close_session(0, index)
    # Another worker takes the idle entry for client C, whose window holds it (its home
    # here), before this one flushes.
    c = next(key for key in (client_key(f"198.51.{n >> 8}.{n & 255}") for n in range(65536))
             if hash(key) & (table.capacity - 1) == index)
    table._map[64 + index * 64:64 + index * 64 + 16] = c
    assert table.open_session(0, c, T0, 0, 0) == index
    assert table.counts(index, T0) == (1, 0)  # C's one session, not A's as well
    assert table.flush(T0)
    assert table.counts(index, T0) == (1, 0)


def test_vacate_clears_a_dead_slots_sessions_and_keeps_the_minutes(table):
    index = table.open_session(1, A, T0, 0, 0)
    table.open_session(1, A, T0, 0, 0)
    table.open_session(0, A, T0, 0, 0)
    table.vacate(1)
    assert table.active(index) == 1
    assert table.counts(index, T0)[0] == 3


def test_a_killed_worker_leaves_its_counts_and_vacate_clears_its_sessions(table):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            for _ in range(3):
                table.open_session(1, A, T0, 0, 10)
            table.open_session(1, B, T0, 0, 10)
            table.flush(T0)  # the end of its turn: counts in shared memory
            table.open_session(1, B, T0, 0, 10)  # counted in its next turn, never ended
            os.write(write, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    os.read(read, 1)
    index = table.lookup(A)
    assert table.active(index) == 3
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert table.active(index) == 3  # until the master vacates the slot
    table.vacate(1)
    assert table.active(index) == 0
    assert table.counts(index, T0)[0] == 3
    assert table.counts(table.lookup(B), T0)[0] == 1  # the turn it was killed in is lost
    assert table.open_session(0, A, T0, 1, 10) == index
    os.close(read)
    os.close(write)


def test_the_lock_is_waited_for_briefly_and_dies_with_its_holder():
    table = ClientTable(1024, 2, lock_wait_s=0.05)
    table.hand_out(0)
    known = table.open_session(0, A, T0, 0, 0)
    assert table.flush(T0)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            assert table._lock()
            os.write(write, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    os.read(read, 1)
    started = time.monotonic()
    assert table.open_session(0, B, T0, 0, 0) == UNCOUNTED  # a new client: not for long
    assert time.monotonic() - started < 2.0
    assert table.lookup(B) is None
    assert table.open_session(0, A, T0, 0, 0) == known  # a known one needs no lock
    assert table.recipient(known, T0, 5) is True
    assert table.flush(T0) is False and table.pending  # kept for the next turn
    assert table.flush(T0, wait=True) is False
    os.kill(pid, signal.SIGKILL)  # dies holding it: the kernel releases it
    os.waitpid(pid, 0)
    assert table.flush(T0) is True and not table.pending
    assert table.counts(known, T0) == (2, 1)
    assert table.open_session(0, B, T0, 0, 0) >= 0
    table.close()
    os.close(read)
    os.close(write)


def test_the_lock_excludes_other_processes_not_ourselves():
    table = ClientTable(1024, 1, lock_wait_s=0.0)
    assert table._lock()
    assert table._lock()  # POSIX record locks are per process: taken again, no wait
    table._unlock()
    pid = os.fork()
    if pid == 0:
        os._exit(0 if table._lock() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    table.close()


def test_a_slot_counter_never_overflows(table):
    index = table.open_session(0, A, T0, 0, 0)
    table._active[index] = anvil.MAX_PER_SLOT
    assert table.open_session(0, A, T0, 0, 0) == UNCOUNTED
    assert table._active[index] == anvil.MAX_PER_SLOT


def test_a_key_is_never_past_a_free_entry_of_its_window_whatever_happens():
    """What lets a new client skip the window search when its home entry is free: no
    entry is ever freed, so every entry between a key's home and its own is taken. A
    small table (two windows) under random sessions, closes, flushes and vacated slots
    keeps that, holds each key once, and finds each key where it is."""
    rng = random.Random(7)
    table = ClientTable(WINDOW * 2, 3)
    for slot in range(3):
        table.hand_out(slot)
    keys = [client_key(f"198.51.100.{n}") for n in range(40)]
    open_sessions: list[tuple[int, int]] = []
    now = T0
    try:
        for _ in range(3000):
            now += rng.random()
            action = rng.random()
            if action < 0.6:
                slot = rng.randrange(3)
                key = rng.choice(keys)
                where = table.lookup(key)
                index = table.open_session(slot, key, now, 0, 0)
                if where is not None:
                    assert index == where  # a known client keeps its entry
                if index >= 0:
                    open_sessions.append((slot, index))
            elif action < 0.9 and open_sessions:
                table.close_session(*open_sessions.pop(rng.randrange(len(open_sessions))))
            elif action < 0.97:
                table.flush(now)
            else:
                slot = rng.randrange(3)
                table.vacate(slot)
                open_sessions = [(s, i) for s, i in open_sessions if s != slot]
            seen = {}
            for index in range(table.capacity):
                offset = 64 + index * 64
                key = bytes(table._map[offset:offset + 16])
                if key == anvil.FREE_KEY:
                    continue
                assert key not in seen, "a key held twice"
                seen[key] = index
                home = hash(key) & (table.capacity - 1)
                steps = (index - home) % table.capacity
                assert steps < WINDOW
                for step in range(steps):
                    between = 64 + ((home + step) % table.capacity) * 64
                    assert bytes(table._map[between:between + 16]) != anvil.FREE_KEY
        assert len(seen) == table.capacity  # the table filled, and evictions happened
    finally:
        table.close()


def test_a_home_entry_taken_before_the_lock_sends_a_new_key_further(table):
    """Another worker takes a new client's free home entry between open_session's look
    and the lock: under the lock the entry is seen taken, kept, and the key goes to the
    next free entry of its window."""
    mask = table.capacity - 1
    home = hash(A) & mask
    other = client_key("198.51.100.7")
    offset = anvil._HEADER + home * anvil._ENTRY_BYTES
    anvil._ENTRY.pack_into(table._map, offset, other, T0, 0, 0, 0, 0, 0)
    index = table._take(A, T0)
    assert index == (home + 1) & mask
    assert table._map[offset:offset + 16] == other
    assert table.lookup(A) == index
