"""The master's supervision policy: pure functions over its records of the workers.

Untrusted input: none (records the master keeps, times from its own clock). Kept apart
from the arbiter's processes and signals so each rule can be tested without forking.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WorkerRecord:
    pid: int
    slot: int
    generation: int
    started: float
    retiring_since: float | None = None  # when it was sent SIGTERM
    killed: bool = False


def spawn_delay(crash_streak: int) -> float:
    """Back-off before the next spawn after `crash_streak` workers died young in a row."""
    return 0.0 if crash_streak <= 0 else min(30.0, 0.1 * 2 ** (crash_streak - 1))


def stale_workers(records: list[WorkerRecord], beats: dict[int, float], now: float,
                  timeout_s: float) -> list[WorkerRecord]:
    """Workers whose last heartbeat (by slot) is older than `timeout_s`."""
    return [r for r in records if not r.killed and now - beats[r.slot] > timeout_s]


def workers_to_retire(records: list[WorkerRecord], generation: int, target: int
                      ) -> list[WorkerRecord]:
    """Old generations, then the oldest of the current one beyond `target`."""
    active = [r for r in records if r.retiring_since is None]
    old = [r for r in active if r.generation != generation]
    current = sorted((r for r in active if r.generation == generation), key=lambda r: r.started)
    return old + current[: max(0, len(current) - target)]


def workers_missing(records: list[WorkerRecord], generation: int, target: int) -> int:
    current = [r for r in records if r.generation == generation and r.retiring_since is None]
    return max(0, target - len(current))


def overdue(records: list[WorkerRecord], now: float, grace_s: float) -> list[WorkerRecord]:
    """Retiring workers that ignored SIGTERM for longer than `grace_s`."""
    return [r for r in records if r.retiring_since is not None and not r.killed
            and now - r.retiring_since > grace_s]
