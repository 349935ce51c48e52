"""The worker count is capped at what the master's heartbeat board holds: in the
configuration, for TTIN, and while an old generation and a new one overlap."""

from __future__ import annotations

import pytest

from minismtp.arbiter import BOARD_SLOTS, Arbiter
from minismtp.config import ConfigError, load_config
from minismtp.values import MAX_WORKERS


@pytest.fixture
def make_arbiter():
    made: list[Arbiter] = []

    def make(workers: int) -> Arbiter:
        made.append(Arbiter(load_config(overrides={"server.workers": workers}), None))
        return made[-1]

    yield make
    for arbiter in made:  # never run: only its selector, wakeup pair and boards to close
        arbiter.sel.close()
        arbiter.wakeup.close()
        arbiter.board.close()
        arbiter.log_board.close()


def test_the_board_holds_two_full_generations():
    assert BOARD_SLOTS == 2 * MAX_WORKERS


def test_more_workers_than_the_cap_are_refused():
    with pytest.raises(ConfigError) as info:
        load_config(overrides={"server.workers": MAX_WORKERS + 1})
    assert info.value.problems == [
        f"server.workers: must be at most {MAX_WORKERS}, got {MAX_WORKERS + 1}"]
    assert load_config(overrides={"server.workers": MAX_WORKERS}).server.workers == MAX_WORKERS


def test_auto_never_exceeds_the_cap(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 4 * MAX_WORKERS)
    assert load_config(overrides={"server.workers": "auto"}).server.workers == MAX_WORKERS


def test_ttin_at_the_cap_keeps_the_count(make_arbiter, caplog):
    arbiter = make_arbiter(MAX_WORKERS)
    arbiter._resize(1)
    assert arbiter.target == MAX_WORKERS
    assert f"workers: {MAX_WORKERS}, the most there can be; TTIN ignored" in caplog.text


def test_with_every_slot_taken_a_spawn_waits_instead_of_failing(make_arbiter, caplog):
    arbiter = make_arbiter(2)
    arbiter.free_slots = []  # a retiring generation and a new one fill the board
    assert arbiter._spawn(0.0, arbiter._current_plan()) is False
    assert arbiter._spawn(1.0, arbiter._current_plan()) is False
    assert arbiter.workers == {}
    assert caplog.text.count("worker slots taken") == 1  # said once, not every turn


def test_workers_killed_at_the_master_s_exit_have_their_lines_written(make_arbiter,
                                                                     monkeypatch):
    """The master's loop can end by an exception: its last act SIGKILLs the workers left,
    and it then reaps them, writing what each held, before it logs its summary."""
    import os
    import signal
    import time

    from minismtp import arbiter as arbiter_module
    from minismtp.supervision import WorkerRecord

    arbiter = make_arbiter(1)
    read_end, write_end = os.pipe()
    monkeypatch.setattr(arbiter_module, "log_stream", lambda: write_end)
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker: holds a line, then waits to be killed
        arbiter.log_board.slot(3).add(b"a line it held\n")
        os.write(ready_write, b"!")
        while True:
            time.sleep(1)
    try:
        arbiter.workers[pid] = WorkerRecord(pid, 3, 0, time.monotonic())
        os.read(ready_read, 1)
        arbiter._kill_all(signal.SIGKILL)
        arbiter._reap_killed(time.monotonic() + 5)
        assert arbiter.workers == {}
        assert os.read(read_end, 100) == b"a line it held\n"
    finally:
        if pid in arbiter.workers:  # the test failed before the reaping: no orphan
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for fd in (read_end, write_end, ready_read, ready_write):
            os.close(fd)


def test_a_fork_that_fails_gives_its_slot_back_and_backs_off(make_arbiter, monkeypatch, caplog):
    """Out of processes or memory: no worker, no slot lost, no master brought down; the
    next attempt waits, as after a worker that died young."""
    import errno
    import os

    arbiter = make_arbiter(1)
    monkeypatch.setattr(arbiter.listeners, "for_worker", lambda *args: [])

    def no_fork():
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    monkeypatch.setattr(os, "fork", no_fork)
    free = len(arbiter.free_slots)
    assert arbiter._spawn(100.0, arbiter._current_plan()) is False
    assert len(arbiter.free_slots) == free and not arbiter.workers
    assert arbiter.backoff.streak == 1 and arbiter.backoff.next_at > 100.0
    assert "cannot start a worker: fork: Resource temporarily unavailable" in caplog.text


def test_back_off_grows_while_a_worker_keeps_dying_beside_a_healthy_one(make_arbiter,
                                                                      monkeypatch):
    """A sibling that has lived for an hour says nothing about why the new one dies: the
    streak (and the wait before the next fork) grows until a worker started since the
    last death lives."""
    import signal
    import time

    from minismtp.supervision import WorkerRecord

    arbiter = make_arbiter(2)
    monkeypatch.setattr(arbiter, "_spawn", lambda now, plan: True)
    monkeypatch.setattr(arbiter, "_check_heartbeats", lambda records, now: None)

    def no_signals(record, signum):  # the records' pids are made up: signal nobody
        raise AssertionError(f"signal {signum} to {record.pid}")

    monkeypatch.setattr(arbiter, "_signal", no_signals)
    healthy = WorkerRecord(10**6, 0, 0, started=time.monotonic() - 3600)
    arbiter.workers[healthy.pid] = healthy
    for n in range(1, 6):
        young = WorkerRecord(2 * 10**6 + n, 1, 0, started=time.monotonic())
        arbiter._report_exit(young, signal.SIGSEGV)  # the status of a worker killed by it
        arbiter._maintain(time.monotonic())  # the master's next turn
        assert arbiter.backoff.streak == n
    assert arbiter.backoff.next_at - time.monotonic() > 1.0  # 1.6 s after the fifth
    lived = WorkerRecord(3 * 10**6, 1, 0, started=arbiter.backoff.crashed_at + 0.001)
    arbiter.workers[lived.pid] = lived
    arbiter._maintain(lived.started + 6)
    assert arbiter.backoff.streak == 0
