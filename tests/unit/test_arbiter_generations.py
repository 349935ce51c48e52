"""A new generation starts beside the old one, which serves until the new one is ready:
the master's own loop step (`_maintain`) on an arbiter that is never run."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from minismtp import exitcodes
from minismtp.arbiter import Arbiter
from minismtp.config import load_config
from minismtp.supervision import WorkerRecord


@pytest.fixture
def arbiter():
    arbiter = Arbiter(load_config(overrides={"server.workers": 1}), None)
    yield arbiter
    arbiter.sel.close()  # never run: only its selector, wakeup pair and boards to close
    arbiter.wakeup.close()
    arbiter.board.close()
    arbiter.log_board.close()


@pytest.fixture
def old_worker(arbiter):
    """A process of our own standing in for a healthy worker of generation 0, accepting."""
    proc = subprocess.Popen(["sleep", "30"])
    now = time.monotonic()
    slot = arbiter.free_slots.pop()
    arbiter.board.hand_out(slot, now)
    arbiter.board.loads[slot] = 0  # listening, no session
    arbiter.workers[proc.pid] = WorkerRecord(proc.pid, slot, 0, now - 60.0)
    yield arbiter.workers[proc.pid]
    proc.kill()
    proc.wait()


def test_while_the_new_generation_cannot_start_the_old_one_keeps_serving(arbiter, old_worker):
    now = time.monotonic()
    arbiter.generation = 1  # a reload
    arbiter.backoff.next_at = now + 30.0  # workers kept dying young: the next one waits
    for turn in range(3):
        arbiter._maintain(now + turn)
    assert old_worker.retiring_since is None
    assert arbiter.serving == 0


_BOOT_FAILED = exitcodes.WORKER_BOOT_FAILED << 8  # a wait status: exited with that code


def test_a_worker_that_cannot_start_before_the_first_ready_stops_the_server(arbiter):
    now = time.monotonic()
    arbiter._report_exit(WorkerRecord(1, 1, 0, now), _BOOT_FAILED)
    assert arbiter.stopping
    assert arbiter.exit_code == exitcodes.FAILURE


def test_a_replacement_that_cannot_start_once_serving_backs_off(arbiter, old_worker, caplog):
    now = time.monotonic()
    arbiter._maintain(now)  # its one worker accepts: the server has been ready
    arbiter._report_exit(WorkerRecord(1, 1, 0, now), _BOOT_FAILED)  # its sibling's
    assert not arbiter.stopping
    assert arbiter.exit_code == exitcodes.OK
    assert arbiter.backoff.next_at > now
    assert old_worker.retiring_since is None
    assert "worker 1 could not start; replacing it" in caplog.text


def test_while_the_new_generation_is_not_ready_the_serving_one_is_refilled(arbiter,
                                                                          monkeypatch):
    """Its workers died (OOM, SIGKILL) while the new generation crashes in a loop (its
    back-off long): replacements of the serving generation start at once, with its own
    configuration and count."""
    started = []
    monkeypatch.setattr(arbiter, "_spawn", lambda now, plan: started.append(plan) or True)
    now = time.monotonic()
    serving = arbiter.serving_plan
    arbiter.generation, arbiter.target = 1, 3  # a reload to three workers
    arbiter.backoff.next_at = now + 30.0  # its workers kept dying young
    arbiter._maintain(now)
    assert started == [serving]
    assert (serving.generation, serving.target) == (0, 1)


def test_a_refill_dying_young_backs_off_apart_from_the_new_generation(arbiter, caplog):
    now = time.monotonic()
    arbiter.generation = 1
    arbiter._report_exit(WorkerRecord(1, 1, 0, now), signal.SIGKILL)
    assert "worker 1 was killed by signal 9; replacing it" in caplog.text
    assert arbiter.refill_backoff.streak == 1 and arbiter.backoff.streak == 0


@pytest.mark.parametrize("retiring", [True, False])
def test_a_worker_nothing_replaces_is_not_said_to_be_replaced(arbiter, caplog, retiring):
    """Told to stop (it crashed on its way out), or of a generation left behind."""
    now = time.monotonic()
    arbiter.generation, arbiter.serving = 2, 1
    record = WorkerRecord(7, 1, 1 if retiring else 0, now - 60,
                          retiring_since=now if retiring else None)
    arbiter._report_exit(record, 1 << 8)  # exited with status 1
    assert "worker 7 exited with status 1" in caplog.text
    assert "replacing it" not in caplog.text
    assert arbiter.backoff.streak == 0 and arbiter.refill_backoff.streak == 0
