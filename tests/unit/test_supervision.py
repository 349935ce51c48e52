"""The master's supervision rules, on records alone: back-off, stale beats, retiring, respawn."""

from __future__ import annotations

import itertools
import signal

import pytest

from minismtp.listeners import worker_positions
from minismtp.supervision import (
    WorkerRecord, attended, free_index, generation_ready, overdue, places_missing, resized,
    spawn_delay, stale_signals, stale_workers, workers_missing, workers_to_retire,
)
from minismtp.values import MAX_WORKERS


def record(pid: int, generation: int = 0, started: float = 0.0, **kwargs) -> WorkerRecord:
    return WorkerRecord(pid, slot=pid % 10, generation=generation, started=started, **kwargs)


@pytest.mark.parametrize("streak, delay", [
    (-1, 0.0), (0, 0.0), (1, 0.1), (2, 0.2), (3, 0.4), (9, 25.6), (10, 30.0), (50, 30.0),
])
def test_spawn_back_off_doubles_up_to_thirty_seconds(streak, delay):
    assert spawn_delay(streak) == pytest.approx(delay)


def test_stale_workers_are_those_whose_beat_is_older_than_the_timeout():
    fresh, old, killed = record(1), record(2), record(3, killed=True)
    beats = {fresh.slot: 95.0, old.slot: 69.0, killed.slot: 0.0}
    assert stale_workers([fresh, old, killed], beats, now=100.0, timeout_s=30.0) == [old]
    # Exactly at the timeout is not yet stale.
    assert stale_workers([old], {old.slot: 70.0}, now=100.0, timeout_s=30.0) == []


def test_retire_the_old_generation_first():
    old_a, old_b = record(1, generation=0), record(2, generation=0)
    new_a = record(3, generation=1, started=5.0, ready=True)
    new_b = record(4, generation=1, started=6.0, ready=True)
    assert workers_to_retire([old_a, new_a, old_b, new_b], generation=1, target=2,
                             serving=0) == [old_a, old_b]


def test_the_old_generation_serves_until_every_new_worker_is_ready():
    old = record(1, generation=0, ready=True)
    new_a = record(2, generation=1, started=5.0, ready=True)
    new_b = record(3, generation=1, started=6.0)
    assert workers_to_retire([old, new_a], generation=1, target=2, serving=0) == []
    assert workers_to_retire([old, new_a, new_b], generation=1, target=2, serving=0) == []
    new_b.ready = True
    assert workers_to_retire([old, new_a, new_b], generation=1, target=2, serving=0) == [old]


def test_a_generation_superseded_before_it_was_ready_goes_at_once():
    serving = record(1, generation=0, ready=True)
    superseded = record(2, generation=1, ready=True)  # its sibling never started
    starting = record(3, generation=2)
    assert workers_to_retire([serving, superseded, starting], generation=2, target=2,
                             serving=0) == [superseded]


def test_generation_ready_needs_the_whole_target_each_seen_accepting():
    a, b = record(1, generation=1, ready=True), record(2, generation=1, ready=True)
    leaving = record(3, generation=1, ready=True, retiring_since=1.0)
    assert generation_ready([a, b], generation=1, target=2)
    assert not generation_ready([a, leaving], generation=1, target=2)
    assert not generation_ready([a, record(4, generation=1)], generation=1, target=2)
    assert not generation_ready([a, b], generation=2, target=1)


def test_beyond_the_target_the_oldest_of_the_current_generation_goes():
    young, oldest, middle = (record(1, started=30.0), record(2, started=10.0),
                             record(3, started=20.0))
    assert workers_to_retire([young, oldest, middle], generation=0, target=1, serving=0) == [
        oldest, middle]
    assert workers_to_retire([young, oldest, middle], generation=0, target=3, serving=0) == []


def test_a_worker_already_retiring_is_not_retired_twice():
    leaving = record(1, generation=0, retiring_since=50.0)
    assert workers_to_retire([leaving, record(2, generation=1, ready=True)], 1, target=1,
                             serving=1) == []


def test_missing_workers_count_only_the_current_generation_not_retiring():
    records = [record(1, generation=0), record(2, generation=1),
               record(3, generation=1, retiring_since=5.0)]
    assert workers_missing(records, generation=1, target=3) == 2
    assert workers_missing(records, generation=1, target=1) == 0
    assert workers_missing([], generation=0, target=2) == 2


def test_overdue_workers_ignored_sigterm_past_the_grace():
    late = record(1, retiring_since=10.0)
    on_time = record(2, retiring_since=40.0)
    already_killed = record(3, retiring_since=0.0, killed=True)
    working = record(4)
    assert overdue([late, on_time, already_killed, working], now=50.0, grace_s=35.0) == [late]


def test_a_stale_worker_gets_sigabrt_first():
    fresh, stale = record(1), record(2)
    beats = {fresh.slot: 95.0, stale.slot: 60.0}
    assert stale_signals([fresh, stale], beats, now=100.0, timeout_s=30.0,
                         abort_grace_s=2.0) == [(stale, signal.SIGABRT)]


def test_sigkill_follows_only_once_the_abort_grace_has_passed():
    aborted = record(1, aborted_at=100.0)
    beats = {aborted.slot: 60.0}
    assert stale_signals([aborted], beats, now=101.0, timeout_s=30.0, abort_grace_s=2.0) == []
    assert stale_signals([aborted], beats, now=102.0, timeout_s=30.0, abort_grace_s=2.0) == []
    assert stale_signals([aborted], beats, now=102.5, timeout_s=30.0, abort_grace_s=2.0) == [
        (aborted, signal.SIGKILL)]


def test_a_killed_worker_gets_no_more_signals():
    killed = record(1, aborted_at=50.0, killed=True)
    assert stale_signals([killed], {killed.slot: 0.0}, now=100.0, timeout_s=30.0,
                         abort_grace_s=2.0) == []


def test_a_worker_that_beats_again_after_sigabrt_is_left_alone():
    # It handled the signal (or the beat was late, not stuck): no SIGKILL for a live worker.
    recovered = record(1, aborted_at=90.0)
    assert stale_signals([recovered], {recovered.slot: 99.0}, now=100.0, timeout_s=30.0,
                         abort_grace_s=2.0) == []


def test_free_index_is_the_lowest_place_no_working_member_holds():
    records = [record(1, generation=1, index=0), record(2, generation=1, index=2),
               record(3, generation=0, index=1),  # an old generation's place is free
               record(4, generation=1, index=1, retiring_since=5.0)]  # so is a leaver's
    assert free_index(records, generation=1) == 1
    assert free_index([], generation=0) == 0
    assert free_index([record(1, index=0), record(2, index=1)], generation=0) == 2


def test_places_missing_are_those_of_the_target_no_working_member_holds():
    records = [record(1, generation=1, index=0), record(2, generation=1, index=2),
               record(3, generation=0, index=1),  # another generation's
               record(4, generation=1, index=1, retiring_since=5.0)]  # a leaver's
    assert places_missing(records, generation=1, target=3) == [1]
    assert places_missing(records, generation=1, target=2) == [1]
    assert places_missing([], generation=0, target=2) == [0, 1]


def test_attended_sockets_are_those_of_working_members_of_every_generation():
    """Set up or starting (crashing at start, maybe: it holds them until it dies), not
    told to stop."""
    s0, s1, s2, s3 = (object() for _ in range(4))
    records = [
        record(1, generation=0, ready=True, listeners=(s0,)),
        record(2, generation=1, listeners=(s0, s1)),
        record(3, generation=1, ready=True, retiring_since=5.0, listeners=(s2,)),
        record(4, generation=2, retiring_since=5.0, listeners=(s3,)),
    ]
    assert attended(records) == {s0, s1}
    assert attended([]) == set()


def test_each_worker_is_given_its_own_shutdown_timeout():
    # After a reload shortened server.shutdown_timeout, a worker of the old generation
    # still has its old, longer time to finish its transactions.
    old = record(1, generation=0, retiring_since=10.0, shutdown_timeout_s=30.0)
    new = record(2, generation=1, retiring_since=10.0, shutdown_timeout_s=5.0)
    assert overdue([old, new], now=26.0, grace_s=5.0) == [new]
    assert overdue([old, new], now=46.0, grace_s=5.0) == [old, new]


@pytest.mark.parametrize("reuse_port", [True, False])
def test_a_new_count_is_a_new_generation_only_with_reuse_port(reuse_port):
    assert resized(2, 1, reuse_port) == (3, reuse_port)
    assert resized(2, -1, reuse_port) == (1, reuse_port)
    assert resized(2, 3, reuse_port) == (5, reuse_port)
    assert resized(1, -1, reuse_port) == (1, False)  # never fewer than one: no change
    assert resized(MAX_WORKERS, 1, reuse_port) == (MAX_WORKERS, False)


class ReusePortMaster:
    """The master's bookkeeping with reuse_port, as its loop turns apply the rules above
    (workers ready as soon as started, none slow to exit): which sockets of a group
    (positions; the group grows as ListenerPool.for_worker grows it, never shrinks) each
    worker accepts from."""

    def __init__(self, workers: int) -> None:
        self.target, self.generation, self.serving = workers, 0, 0
        self.group_size = 1
        self.workers: dict[int, tuple[WorkerRecord, range]] = {}
        self.pids = iter(range(1, 10_000))
        self.settle()

    def records(self) -> list[WorkerRecord]:
        return [record for record, _ in self.workers.values()]

    def settle(self) -> None:
        for _ in range(4):  # a generation starts in one turn and retires the old in the next
            records = self.records()
            if generation_ready(records, self.generation, self.target):
                self.serving = self.generation
            for record in workers_to_retire(records, self.generation, self.target,
                                            self.serving):
                del self.workers[record.pid]  # it closes its sockets at once
            for _ in range(workers_missing(self.records(), self.generation, self.target)):
                index = free_index(self.records(), self.generation)
                self.group_size = max(self.group_size, index + 1)
                pid = next(self.pids)
                self.workers[pid] = (
                    WorkerRecord(pid, pid, self.generation, float(pid), index=index,
                                 ready=True),
                    worker_positions(self.group_size, index, self.target))

    def resize(self, step: int) -> None:
        self.target, new_generation = resized(self.target, step, reuse_port=True)
        self.generation += new_generation
        self.settle()

    def worker_dies(self, index: int) -> None:
        for record, _ in list(self.workers.values()):
            if record.generation == self.generation and record.index == index:
                del self.workers[record.pid]
        self.settle()

    def sockets_without_a_worker(self) -> set[int]:
        held = {position for _, positions in self.workers.values() for position in positions}
        return set(range(self.group_size)) - held


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_with_reuse_port_every_socket_keeps_a_worker_whatever_ttin_ttou_and_deaths(workers):
    steps = ("TTIN", "TTOU", 0, 1, 2, 3)  # a signal, or the death of the worker at that index
    for sequence in itertools.product(steps, repeat=4):
        master = ReusePortMaster(workers)
        for step in sequence:
            if step == "TTIN":
                master.resize(1)
            elif step == "TTOU":
                master.resize(-1)
            else:
                master.worker_dies(step)
            assert master.sockets_without_a_worker() == set(), (workers, sequence)
