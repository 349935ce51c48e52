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
from minismtp.listeners import is_listening, shares_port
from minismtp.supervision import WorkerRecord


def _arbiter(overrides: dict[str, object]):
    arbiter = Arbiter(load_config(overrides=overrides), None)
    yield arbiter
    arbiter.listeners.close()
    arbiter.sel.close()  # never run: only its selector, wakeup pair and boards to close
    arbiter.wakeup.close()
    arbiter.board.close()
    arbiter.log_board.close()


@pytest.fixture
def arbiter():
    yield from _arbiter({"server.workers": 1})


@pytest.fixture
def two_on_reuse_port():
    yield from _arbiter({"server.workers": 2, "server.reuse_port": True,
                         "server.listen": ["127.0.0.1:0"]})


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


def _dropped_after_ttin(arbiter, dead: int | None = None):
    """Generation 0, two workers on reuse_port, serves on the group's first two sockets
    (but the one at place `dead`, to be replaced). A TTIN's generation of three made the
    third socket listen, for its third worker, and a TTOU dropped it before it was ready:
    generation 2, of two, starts. Returns the serving sockets and the third."""
    pool, config, now = arbiter.listeners, arbiter.config, time.monotonic()
    pool.bind_missing(config)
    serving = [pool.for_worker(config, index, 2) for index in range(2)]
    for index, share in enumerate(serving):
        for sock in share:
            if not is_listening(sock):
                sock.listen()  # the worker, set up
        if index != dead:
            arbiter.workers[10 + index] = WorkerRecord(
                10 + index, index, 0, now - 60, index=index, ready=True,
                listeners=tuple(share))
    [third] = pool.for_worker(config, 2, 3)
    third.listen()
    arbiter.workers[12] = WorkerRecord(12, 2, 1, now - 1, index=2, ready=True,
                                       retiring_since=now, listeners=(third,))
    arbiter.generation, arbiter.target = 2, 2
    return [sock for share in serving for sock in share], third


@pytest.mark.parametrize("dead", [None, 0, 1], ids=["whole", "first-dead", "second-dead"])
def test_a_socket_only_a_dropped_generation_listened_on_is_renewed(two_on_reuse_port, dead):
    """The third socket is closed and a bound one, not listening, takes its place, unless
    the replacement of a dead worker of the serving generation takes it (the first one's,
    taking sockets 0 and 2 of the three). The serving generation's sockets keep
    listening, a dead worker's too: its replacement takes its queue."""
    arbiter = two_on_reuse_port
    serving, third = _dropped_after_ttin(arbiter, dead)
    address = third.getsockname()
    arbiter._close_unattended()
    [group] = arbiter.listeners.groups.values()
    assert group[:2] == serving and all(is_listening(sock) for sock in serving)
    if dead == 0:
        assert group[2] is third and is_listening(third)
    else:
        assert group[2] is not third and third.fileno() == -1
        assert shares_port(group[2]) and not is_listening(group[2])
        assert group[2].getsockname() == address


def test_a_dropped_generations_socket_is_kept_while_a_starting_worker_holds_it(
        two_on_reuse_port):
    """The new generation's first worker, starting, took the third socket (listening
    already): it accepts from it once set up. If it dies instead, the third socket is
    renewed then."""
    arbiter = two_on_reuse_port
    serving, third = _dropped_after_ttin(arbiter)
    arbiter.workers[20] = WorkerRecord(20, 3, 2, time.monotonic(), index=0,
                                       listeners=(serving[0], third))
    arbiter._close_unattended()
    assert arbiter.listeners.all()[2] is third and is_listening(third)
    del arbiter.workers[20]  # crashed at start
    arbiter._close_unattended()
    assert arbiter.listeners.all()[2] is not third and third.fileno() == -1
