"""Which workers accept: the fill policy, its inputs (board, /proc/stat) and one gate."""

from __future__ import annotations

import os
import time

import pytest

from minismtp.accepting import (
    FULL, JOIN_BUSY, LEAVE_BUSY, LIVE_S, STOPPING, AcceptGate, IdleCpus, should_accept,
)
from minismtp.heartbeat import HeartbeatBoard, WorkerLoad


def load(slot: int, busy: float = 0.0, flags: int = 0) -> WorkerLoad:
    return WorkerLoad(slot, 100.0, busy, flags)


# --- the policy -----------------------------------------------------------------------


def test_the_first_worker_always_accepts():
    assert should_accept(load(0), False, [load(1, 1.0), load(2, 1.0)], 0.0)
    assert should_accept(load(3), False, [load(4)], None)  # lower slots gone: first in line


def test_a_stopping_worker_ahead_does_not_count():
    assert should_accept(load(1), False, [load(0, flags=STOPPING)], 0.0)


def test_the_next_worker_waits_while_the_first_has_room():
    assert not should_accept(load(1), False, [load(0, JOIN_BUSY - 0.01)], 2.0)


def test_it_joins_when_the_first_is_saturated_and_a_cpu_is_idle():
    assert should_accept(load(1), False, [load(0, JOIN_BUSY)], 0.5)
    assert should_accept(load(1), False, [load(0, 0.99)], None)  # idle time unknown


def test_it_stays_out_when_no_cpu_is_idle_for_it():
    # The first worker is busy, but the other CPUs are busy too (a client beside us):
    # another worker would only contend for them.
    assert not should_accept(load(1), False, [load(0, 0.99)], 0.12)


def test_it_joins_a_full_worker_whatever_the_cpus():
    assert should_accept(load(1), False, [load(0, 0.1, FULL)], 0.0)


def test_all_workers_ahead_must_be_saturated():
    ahead = [load(0, 0.95), load(1, 0.2)]  # worker 1 joins first
    assert not should_accept(load(2), False, ahead, 4.0)
    assert should_accept(load(2), False, [load(0, 0.95), load(1, 0.9)], 4.0)


def test_a_joined_worker_stays_while_the_load_needs_it():
    # Split between two, each is below the join threshold but above the leave one.
    assert should_accept(load(1, 0.45), True, [load(0, 0.45)], 6.0)
    assert should_accept(load(1, 0.9), True, [load(0, 0.95)], 0.0)  # all saturated


def test_a_joined_worker_leaves_when_the_first_has_room_again():
    assert not should_accept(load(1), True, [load(0, LEAVE_BUSY - 0.01)], 6.0)


def test_a_joined_worker_leaves_when_workers_only_contend_for_cpus():
    # Neither saturated nor any CPU idle: the workers compete for CPUs, not for work.
    assert not should_accept(load(1, 0.43), True, [load(0, 0.43)], 0.3)


def test_no_flapping_between_join_and_leave_thresholds():
    # A load that just saturates one worker, split in two, must not look idle.
    assert JOIN_BUSY / 2 > LEAVE_BUSY


def test_a_full_worker_hands_new_connections_to_one_with_room():
    assert not should_accept(load(0, 0.3, FULL), True, [load(1)], 0.0)
    assert should_accept(load(0, 0.3, FULL), True, [load(1, flags=FULL)], 0.0)  # all full
    assert should_accept(load(0, 0.3, FULL), True, [load(1, flags=FULL | STOPPING)], 0.0)


# --- the board ------------------------------------------------------------------------


def test_board_lists_live_slots_in_order_and_forgets_cleared_ones():
    board = HeartbeatBoard(8)
    board.beat(5, 100.0, 0.5, FULL)
    board.beat(2, 99.0)
    board.beat(7, 90.0)  # too old
    assert board.loads(since=95.0) == [WorkerLoad(2, 99.0, 0.0, 0),
                                       WorkerLoad(5, 100.0, 0.5, FULL)]
    board.clear(5)
    assert [w.slot for w in board.loads(since=95.0)] == [2]
    assert board.last(5) == 0.0


def test_board_records_are_shared_across_fork():
    board = HeartbeatBoard(2)
    pid = os.fork()
    if pid == 0:
        board.beat(1, 50.0, 0.75, STOPPING)
        os._exit(0)
    os.waitpid(pid, 0)
    assert board.loads(since=1.0) == [WorkerLoad(1, 50.0, 0.75, STOPPING)]


# --- idle CPUs ------------------------------------------------------------------------

STAT = """cpu  {t} 0 {t} {idle0_1} 0 0 0 0 0 0
cpu0 100 0 100 {idle0} {wait0} 0 0 0 0 0
cpu1 100 0 100 {idle1} 0 0 0 0 0 0
intr 12345
"""


def write_stat(path, idle0: int, wait0: int, idle1: int) -> None:
    path.write_text(STAT.format(t=200, idle0_1=idle0 + idle1, idle0=idle0, wait0=wait0,
                                idle1=idle1))


def test_idle_cpus_counts_idle_and_iowait_of_allowed_cpus_only(tmp_path):
    stat = tmp_path / "stat"
    idle = IdleCpus(str(stat))
    idle.tick, idle.cpus = 100, {"cpu0"}
    write_stat(stat, 1000, 10, 5000)
    assert idle.sample(10.0) is None  # nothing to compare with yet
    write_stat(stat, 1030, 30, 5200)  # cpu0: 30 + 20 ticks idle in 2 s; cpu1 not ours
    assert idle.sample(12.0) == pytest.approx(0.25)
    both = IdleCpus(str(stat))
    both.tick, both.cpus = 100, {"cpu0", "cpu1"}
    both.sample(12.0)
    write_stat(stat, 1030, 30, 5300)  # only cpu1 idled, 100 ticks in 1 s
    assert both.sample(13.0) == pytest.approx(1.0)


def test_idle_cpus_unknown_without_proc_stat(tmp_path):
    idle = IdleCpus(str(tmp_path / "missing"))
    assert idle.sample(1.0) is None
    assert idle.sample(2.0) is None


def test_idle_cpus_reads_this_machine():
    idle = IdleCpus()
    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat here")
    idle.sample(0.0)
    value = idle.sample(1.0)
    assert value is not None and value >= 0.0


# --- one worker's gate ----------------------------------------------------------------


class FixedIdle(IdleCpus):
    def __init__(self, value: float | None) -> None:
        self.value = value
        self.available = value is not None

    def sample(self, now: float) -> float | None:
        return self.value


def test_gate_publishes_its_load_and_follows_the_worker_ahead():
    board = HeartbeatBoard(4)
    first = AcceptGate(board, 0, fill=True, max_connections=100, idle=FixedIdle(0.0))
    second = AcceptGate(board, 1, fill=True, max_connections=100, idle=FixedIdle(1.5))
    now = 1000.0
    assert first.publish(now, sessions=3, stopping=False)
    assert not second.publish(now, sessions=0, stopping=False)
    [mine] = [w for w in board.loads(now - LIVE_S) if w.slot == 0]
    assert mine.flags == 0 and mine.busy >= 0.0
    board.beat(0, now, 0.97, 0)  # the first saturates, and a CPU is idle
    assert second.decide(now)
    first.publish(now + 1, sessions=95, stopping=False)  # 90% of its limit: full
    [mine] = [w for w in board.loads(now - LIVE_S) if w.slot == 0]
    assert mine.flags == FULL
    assert not first.accepting  # the second has room
    second.publish(now + 1, sessions=0, stopping=True)
    assert first.decide(now + 1)  # nobody else can take them
    assert not second.decide(now + 1)


def test_gate_forgets_workers_that_stopped_beating():
    board = HeartbeatBoard(2)
    second = AcceptGate(board, 1, fill=True, max_connections=100, idle=FixedIdle(0.0))
    board.beat(0, 1000.0)
    assert not second.publish(1000.5, sessions=0, stopping=False)
    assert second.decide(1000.0 + LIVE_S + 0.1)


def test_spread_gate_always_accepts():
    board = HeartbeatBoard(2)
    board.beat(0, 1000.0)
    gate = AcceptGate(board, 1, fill=False, max_connections=100, idle=FixedIdle(0.0))
    assert gate.accepting
    assert gate.publish(1000.0, sessions=0, stopping=False)


def test_gate_does_not_mistake_its_start_up_for_load():
    # Starting is all CPU: measured over its first instants, a worker would look
    # saturated and call in the next one. Busy is measured over half a second at least.
    board = HeartbeatBoard(2)
    first = AcceptGate(board, 0, fill=True, max_connections=100, idle=FixedIdle(1.0))
    second = AcceptGate(board, 1, fill=True, max_connections=100, idle=FixedIdle(1.0))
    sum(range(200_000))
    first.publish(time.monotonic(), sessions=0, stopping=False)
    assert board.loads(0.0)[0].busy == 0.0
    assert not second.publish(time.monotonic(), sessions=0, stopping=False)


def test_gate_waits_for_a_measurement_of_idle_cpus_before_joining():
    board = HeartbeatBoard(2)
    board.beat(0, 1000.0, 0.99, 0)

    class FirstSample(FixedIdle):
        """As from /proc/stat: nothing to compare with at first, then two idle CPUs."""

        def __init__(self) -> None:
            super().__init__(None)
            self.available = True

        def sample(self, now: float) -> float | None:
            value, self.value = self.value, 2.0
            return value

    second = AcceptGate(board, 1, fill=True, max_connections=100, idle=FirstSample())
    assert not second.publish(1000.0, sessions=0, stopping=False)  # no figure yet
    assert second.publish(1001.0, sessions=0, stopping=False)  # two CPUs idle
