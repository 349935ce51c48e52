"""The master's supervision policy: pure functions over its records of the workers.

Untrusted input: none (records the master keeps, times from its own clock). Kept apart
from the arbiter's processes and signals so each rule can be tested without forking.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

from minismtp.values import MAX_WORKERS

if TYPE_CHECKING:
    import socket
    import ssl

    from minismtp.config import Config
    from minismtp.stats import RuleName


@dataclass
class WorkerRecord:
    pid: int
    slot: int
    generation: int
    started: float
    retiring_since: float | None = None  # when it was sent SIGTERM
    killed: bool = False  # sent SIGKILL
    index: int = 0  # its place in its generation (which reuse_port sockets it takes)
    aborted_at: float | None = None  # when it was sent SIGABRT for a missed heartbeat
    tmp_dir: str | None = None  # the Maildir tmp/ it writes in, swept when it dies
    shutdown_timeout_s: float = 0.0  # its own config's: a reload does not change it
    # Its config's listener names, by place, and fault rule labels, by index: what its
    # stats slot counts (stats.py).
    listener_names: tuple[str, ...] = ()
    rule_names: tuple[RuleName, ...] = ()
    host: str = ""  # this host's name when it was started: its Maildir files carry it
    ready: bool = False  # seen accepting (the heartbeat board) at least once
    # The master's listening sockets it took (listeners.for_worker): it makes them listen
    # once set up, and closes them when told to stop.
    listeners: tuple[socket.socket, ...] = ()


@dataclass(frozen=True)
class Plan:
    """What a generation's workers are started with: a replacement is started as the
    worker it replaces was, whichever generation is current."""

    generation: int
    config: Config
    worker_config: Config  # with max_connections fitted to the descriptor limit
    target: int  # its worker count: with reuse_port, which sockets each index takes
    tls_context: ssl.SSLContext | None


@dataclass
class Backoff:
    """The wait before the next spawn while workers keep dying young."""

    streak: int = 0
    crashed_at: float = float("-inf")  # when the streak last grew
    next_at: float = 0.0

    def note_death(self, now: float) -> None:
        self.streak += 1
        self.crashed_at = now
        self.next_at = now + spawn_delay(self.streak)

    def maybe_forgive(self, records: list[WorkerRecord], generation: int, now: float,
                      short_life_s: float) -> None:
        """End the streak once a worker of `generation` started since the last death has
        lived past `short_life_s`: the cause has gone."""
        if self.streak and lived_since(records, generation, self.crashed_at, now,
                                       short_life_s):
            self.streak = 0


def lived_since(records: list[WorkerRecord], generation: int, since: float, now: float,
                short_life_s: float) -> bool:
    """Whether a working member of `generation` started after `since` has lived past
    `short_life_s`. (Not any old worker: a healthy one beside a sibling that keeps dying
    proves nothing, nor does one of another generation, started with another config.)"""
    return any(r.started > since and now - r.started > short_life_s for r in records
               if r.generation == generation and r.retiring_since is None)


def spawn_delay(crash_streak: int) -> float:
    """Back-off before the next spawn after `crash_streak` workers died young in a row."""
    return 0.0 if crash_streak <= 0 else min(30.0, 0.1 * 2 ** (crash_streak - 1))


def stale_workers(records: list[WorkerRecord], beats: dict[int, float], now: float,
                  timeout_s: float) -> list[WorkerRecord]:
    """Workers whose last heartbeat (by slot) is older than `timeout_s`."""
    return [r for r in records if not r.killed and now - beats[r.slot] > timeout_s]


def stale_signals(records: list[WorkerRecord], beats: dict[int, float], now: float,
                  timeout_s: float, abort_grace_s: float) -> list[tuple[WorkerRecord, int]]:
    """Who gets which signal for a missed heartbeat (gunicorn's order).

    First SIGABRT: a worker stuck in a loop or a system call writes where it was
    (faulthandler) and dies. Then SIGKILL, `abort_grace_s` after the SIGABRT, to one
    still alive: stopped, or stuck where not even that handler can run. Each once.
    """
    actions: list[tuple[WorkerRecord, int]] = []
    for record in stale_workers(records, beats, now, timeout_s):
        if record.aborted_at is None:
            actions.append((record, signal.SIGABRT))
        elif now - record.aborted_at > abort_grace_s:
            actions.append((record, signal.SIGKILL))
    return actions


def generation_ready(records: list[WorkerRecord], generation: int, target: int) -> bool:
    """Whether `generation` has its `target` workers, each seen accepting."""
    current = [r for r in records if r.generation == generation and r.retiring_since is None]
    return len(current) >= target and all(r.ready for r in current)


def workers_to_retire(records: list[WorkerRecord], generation: int, target: int,
                      serving: int) -> list[WorkerRecord]:
    """Old generations, then the oldest of the current one beyond `target`.

    `serving` is the last generation that was all ready: it goes on accepting while the
    current one starts, and retires only once that one is ready too (`generation_ready`),
    so that a new generation that cannot start (a back-off, a crash loop) leaves the old
    one serving. A generation between the two, superseded before it was ready, goes at
    once: two generations at most share the heartbeat board.
    """
    active = [r for r in records if r.retiring_since is None]
    keep = generation if generation_ready(records, generation, target) else serving
    old = [r for r in active if r.generation not in (generation, keep)]
    current = sorted((r for r in active if r.generation == generation), key=lambda r: r.started)
    return old + current[: max(0, len(current) - target)]


def attended(records: list[WorkerRecord]) -> set[socket.socket]:
    """The sockets a working member (not retiring) accepts from, or will once set up.
    One that crashes at every start holds its sockets only until it dies: a check made
    then counts its sockets no longer."""
    return {sock for r in records if r.retiring_since is None for sock in r.listeners}


def places_missing(records: list[WorkerRecord], generation: int, target: int) -> list[int]:
    """The places in `generation` of `target` that no working member holds: each gets a
    worker that takes the sockets of that place (free_index)."""
    taken = {r.index for r in records if r.generation == generation and r.retiring_since is None}
    return [index for index in range(target) if index not in taken]


def workers_missing(records: list[WorkerRecord], generation: int, target: int) -> int:
    current = [r for r in records if r.generation == generation and r.retiring_since is None]
    return max(0, target - len(current))


def resized(target: int, step: int, reuse_port: bool) -> tuple[int, bool]:
    """The worker count after `step` TTINs (more) or TTOUs (fewer), from 1 to
    MAX_WORKERS, and whether it needs a new generation.

    With reuse_port a worker accepts from the sockets at its index modulo the count it was
    started with (listeners.worker_positions), and its replacement takes the same index:
    workers of one generation started with different counts would leave a socket to
    nobody. So with reuse_port a new count is a new generation, which shares every socket
    out again; without it every worker accepts from every socket.
    """
    wanted = min(MAX_WORKERS, max(1, target + step))
    return wanted, reuse_port and wanted != target


def free_index(records: list[WorkerRecord], generation: int) -> int:
    """The lowest place in the current generation that no working member holds: a
    replacement takes the place (and the sockets) of the worker it replaces."""
    taken = {r.index for r in records if r.generation == generation and r.retiring_since is None}
    index = 0
    while index in taken:
        index += 1
    return index


def overdue(records: list[WorkerRecord], now: float, grace_s: float) -> list[WorkerRecord]:
    """Retiring workers that ignored SIGTERM for longer than their own shutdown timeout
    plus `grace_s`: a worker finishes transactions by the config it was started with."""
    return [r for r in records if r.retiring_since is not None and not r.killed
            and now - r.retiring_since > r.shutdown_timeout_s + grace_s]
