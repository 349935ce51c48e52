"""Which workers take new connections: fill one worker before waking the next.

Untrusted input: none; the figures come from the workers themselves and /proc/stat.

Every worker waiting on the shared listening socket is woken by each new connection and
the first to run takes it, so even a light load is spread over all workers: each pays
the wake-ups, the failed accepts and a cold cache for a share of the work, and where the
CPUs are needed by other programs too (a load generator on the same machine, say) the
workers contend with them and with each other. (On two CPUs beside such a client, one
worker took 25-30% more messages per second than two sharing the load: bench/README.md.)

With `accept_policy: fill` (the default) only the first worker (the lowest slot that is
not stopping) accepts at first. The next one joins when every worker before it is
saturated (busy for most of the last second, or near max_connections) and a CPU is idle
for it to run on. It leaves again when a worker before it has room to spare, or when the
workers before it are not saturated and no CPU is idle (they contend for CPUs, not for
work). So as many workers accept as the load needs and the machine can run; nginx's
accept_mutex served the same purpose. A worker near its connection limit hands new
connections to one that is not. With `spread`, and with `reuse_port` (where the kernel
gives each worker its own share), every worker accepts.

Workers decide for themselves from the records on the heartbeat board, about once a
second (four times a second while not accepting), so a worker that stops or dies is
replaced at the listening socket within a second; connections wait in the listen
backlog meanwhile, none is refused.
"""

from __future__ import annotations

import os
import time

from minismtp.heartbeat import HeartbeatBoard, WorkerLoad

FULL, STOPPING = 1, 2  # WorkerLoad.flags
LIVE_S = 3.0  # a worker that has not beaten for this long is gone (beats come every second)
JOIN_BUSY = 0.85  # workers ahead at least this busy are saturated...
JOIN_IDLE_CPUS = 0.5  # ...and this much idle CPU lets one more worker help
LEAVE_BUSY = 0.4  # below this, the worker ahead takes the load back (< JOIN_BUSY / 2: no flapping)
FULL_SHARE = 0.9  # of max_connections
_MIN_WINDOW_S = 0.5  # busy is measured over at least this long (not the first instants)


def should_accept(me: WorkerLoad, accepting: bool, others: list[WorkerLoad],
                  idle_cpus: float | None) -> bool:
    """Whether worker `me` should accept now. `others`: the live workers' records;
    `idle_cpus`: idle CPUs over the last second, None where that cannot be read."""
    if me.flags & STOPPING:
        return False
    live = [w for w in others if not w.flags & STOPPING]
    if me.flags & FULL and any(not w.flags & FULL for w in live):
        return False  # near our limit, and someone has room
    ahead = [w for w in live if w.slot < me.slot]
    if not ahead:
        return True
    some_full = any(w.flags & FULL for w in ahead)
    saturated = all(w.flags & FULL or w.busy >= JOIN_BUSY for w in ahead)
    cpu_for_us = some_full or idle_cpus is None or idle_cpus >= JOIN_IDLE_CPUS
    if not accepting:
        return saturated and cpu_for_us
    has_room = any(not w.flags & FULL and w.busy < LEAVE_BUSY for w in ahead)
    return not (has_room or (not saturated and not cpu_for_us))


class IdleCpus:
    """Idle time of the CPUs this process may run on, from /proc/stat (Linux)."""

    def __init__(self, path: str = "/proc/stat") -> None:
        self.path = path
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        try:
            self.cpus = {f"cpu{n}" for n in os.sched_getaffinity(0)}
        except (AttributeError, OSError):
            self.cpus = set()
        self._last: tuple[float, int] | None = None
        self.available = self._read() is not None

    def sample(self, now: float) -> float | None:
        """Idle CPUs (0.5 = half a CPU) since the last sample; None at first or if unknown."""
        idle = self._read()
        if idle is None:
            return None
        last, self._last = self._last, (now, idle)
        if last is None or now <= last[0]:
            return None
        return (idle - last[1]) / self.tick / (now - last[0])

    def _read(self) -> int | None:
        try:
            with open(self.path, "rb") as f:
                lines = f.read().decode("ascii", "replace").splitlines()
        except OSError:
            return None
        total = 0
        for line in lines:
            fields = line.split()
            if fields and fields[0] in self.cpus and len(fields) > 5:
                total += int(fields[4]) + int(fields[5])  # idle + iowait
        return total if self.cpus else None


class AcceptGate:
    """One worker's side: publish its load on the board, decide whether it accepts."""

    def __init__(self, board: HeartbeatBoard, slot: int, fill: bool,
                 max_connections: int, idle: IdleCpus | None = None) -> None:
        self.board = board
        self.slot = slot
        self.fill = fill
        self.full_at = max(1, int(max_connections * FULL_SHARE))
        self.idle = idle if idle is not None else IdleCpus()
        self.accepting = not fill  # fill: decided at the first publish
        self.me = WorkerLoad(slot, 0.0, 0.0, 0)
        # Until measured, no CPU counts as idle; None only where it cannot be measured.
        self.idle_cpus: float | None = 0.0 if self.idle.available else None
        self._cpu = time.process_time()
        self._at = time.monotonic()

    def publish(self, now: float, sessions: int, stopping: bool) -> bool:
        """Beat with this worker's load (about once a second); return `accepting`."""
        busy = self.me.busy
        if now - self._at >= _MIN_WINDOW_S:
            cpu = time.process_time()
            busy = (cpu - self._cpu) / (now - self._at)
            self._cpu, self._at = cpu, now
        flags = (FULL if sessions >= self.full_at else 0) | (STOPPING if stopping else 0)
        self.me = WorkerLoad(self.slot, now, busy, flags)
        self.board.beat(self.slot, now, busy, flags)
        if self.fill:
            idle = self.idle.sample(now)
            if idle is not None:
                self.idle_cpus = idle
        return self.decide(now)

    def decide(self, now: float) -> bool:
        """Look at the other workers' records again; return `accepting`."""
        if self.fill:
            others = [w for w in self.board.loads(now - LIVE_S) if w.slot != self.slot]
            self.accepting = should_accept(self.me, self.accepting, others, self.idle_cpus)
        return self.accepting
