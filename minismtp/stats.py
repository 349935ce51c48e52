"""Live statistics: plain counters in each worker, a shared board, totals in the master.

Untrusted input: none from the network. The board is shared memory that a worker writes
and the master reads; a worker killed mid-write leaves a slot half old, half new, which
the sequence number below detects (and `retire` clears before the slot is reused).

Theory of operation. A worker counts into a `WorkerStats`: slotted attributes and lists
of Python ints, so each increment is one attribute or list store, with no lock, syscall
or message. About once a second, and at exit, `publish` copies every counter into the
worker's slot of a `StatsBoard`, an anonymous shared mmap created by the master before
fork (like `HeartbeatBoard`). The master reads the slots of live workers and adds them to
a `Totals` of retired workers: when a worker exits, its slot is folded into that total
and cleared, so totals never go backwards when workers are replaced. Gauges (open
connections) describe the present, so they are not kept for exited workers.

Slot layout, native byte order, 8-byte fields: a sequence number, the counters of
`_COUNTERS`, the latency buckets, the latency sum (a double), the TLS handshake failures
by reason, the handshake-time buckets, their sum (a double), the PROXY header failures by
reason, the per-client refusals by reason, one counter per reply code
400..599, one per fault rule, then `_PER_LISTENER` counters for each of MAX_LISTENERS
listeners, by their place in server.listen. A slot knows neither the listeners' names
nor the fault rules': the master reads it with the names of the configuration that
worker started with, and keeps listener and rule totals by name, so a reload that adds,
removes or reorders listeners or named rules neither mislabels nor loses counts (a rule
without a name is named by its place, "rule3", which a reorder gives to another). The
writer makes the sequence odd, writes, makes it even (a seqlock); a reader retries while
it is odd or changed under it. (Python gives no memory barriers: on weakly ordered CPUs
this narrows torn reads rather than ruling them out, which is enough for statistics.)
"""

from __future__ import annotations

import copy
import mmap
import struct
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from minismtp.smtp.proxyproto import REASONS as _PROXY_REASONS
from minismtp.values import MAX_LISTENERS

# A fault rule's label: its name, or (listener, name) for a rule of a listener's own
# `faults` (profiles.py numbers those after the top-level ones).
RuleName = str | tuple[str, str]

# Upper bounds, in seconds, of the end-of-data latency buckets; one more bucket is +Inf.
LATENCY_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                  1.0, 2.5, 5.0, 10.0)
_BUCKETS = len(LATENCY_BOUNDS) + 1
# TLS handshakes: upper bounds of the duration buckets (s), and the failure reasons counted
# (tlstransport.handshake_reason's usual words; anything else is "other").
HANDSHAKE_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_HANDSHAKE_BUCKETS = len(HANDSHAKE_BOUNDS) + 1
HANDSHAKE_FAILURES = ("timeout", "unexpected eof", "connection reset", "wrong version number",
                      "http request", "unsupported protocol", "no shared cipher", "stopping",
                      "other")
_FAILURE_INDEX = {reason: index for index, reason in enumerate(HANDSHAKE_FAILURES)}
# PROXY headers that were not had (proxyread.py): the reader's own reasons, then the
# parser's (proxyproto.REASONS), each a fixed label.
PROXY_FAILURES = ("untrusted source", "timeout", "closed mid-header", "stopping",
                  *sorted(_PROXY_REASONS))
_PROXY_INDEX = {reason: index for index, reason in enumerate(PROXY_FAILURES)}
# Refusals by the per-client limits (clientlimits.py): too many sessions open, too many
# new sessions in a minute (both 421 4.7.0), too many recipients in a minute (450 4.7.1).
PER_CLIENT_REASONS = ("sessions", "new_sessions", "recipients")
_PER_CLIENT_INDEX = {reason: index for index, reason in enumerate(PER_CLIENT_REASONS)}
_COUNTERS = ("connections_open", "connections_total", "transactions", "messages_accepted",
             "bytes_received", "tls_sessions", "tls_discarded_bytes", "proxy_headers",
             "auth_successes", "auth_failures", "auth_temporary_failures",
             "per_client_unchecked")
_GAUGES = frozenset({"connections_open"})
_PER_LISTENER = ("sessions", "messages_accepted")  # ListenerCounts, in slot order
_FIRST_CODE, _CODES = 400, 200  # rejections: 4xx and 5xx replies
_SEQ = struct.Struct("=Q")
_LISTENER_FIELDS = MAX_LISTENERS * len(_PER_LISTENER)
_READ_TRIES = 100  # a publish takes microseconds; a slot stuck odd is a dead writer


class ListenerCounts:
    """One listener's counters in a worker, bound to each of its sessions at accept
    (session.Profile.counts), so counting costs an attribute store, no lookup."""

    __slots__ = _PER_LISTENER

    def __init__(self) -> None:
        self.sessions = 0
        self.messages_accepted = 0


class WorkerStats:
    """One worker's counters. Hot-path use, each a single store:

    stats.connections_open += 1; stats.connections_total += 1; stats.transactions += 1
    stats.messages_accepted += 1; stats.bytes_received += n
    stats.replies[reply.code] += 1   # rejections: only codes 400..599 are published
    stats.faults[rule.index] += 1; stats.observe_latency(seconds)
    stats.tls_sessions += 1; stats.tls_discarded_bytes += n   # plaintext after STARTTLS
    stats.observe_handshake(seconds); stats.count_handshake_failure(reason)
    stats.proxy_headers += 1; stats.count_proxy_failure(reason)
    stats.auth_successes += 1; stats.auth_failures += 1   # 235; 535
    stats.auth_temporary_failures += 1                     # 454 (queue full, check failed)
    # (an AUTH a fault rule refuses is in replies and faults, not an auth result)
    stats.count_per_client_refusal(reason); stats.per_client_unchecked += 1
    profile.counts.sessions += 1; profile.counts.messages_accepted += 1   # per listener
    """

    __slots__ = (*_COUNTERS, "replies", "faults", "latency_buckets", "latency_sum",
                 "tls_failures", "handshake_buckets", "handshake_sum",
                 "proxy_failures", "per_client_refused", "listeners")

    def __init__(self, max_rules: int, listeners: int = 0) -> None:
        # By place in server.listen (at most MAX_LISTENERS).
        self.listeners = [ListenerCounts() for _ in range(listeners)]
        self.connections_open = 0
        self.connections_total = 0
        self.transactions = 0
        self.messages_accepted = 0
        self.bytes_received = 0
        self.replies = [0] * 600  # indexed by the reply code itself: no arithmetic per use
        self.faults = [0] * max_rules
        self.latency_buckets = [0] * _BUCKETS
        self.latency_sum = 0.0
        self.tls_sessions = 0
        self.tls_discarded_bytes = 0
        self.auth_successes = 0
        self.auth_failures = 0
        self.auth_temporary_failures = 0
        self.tls_failures = [0] * len(HANDSHAKE_FAILURES)
        self.handshake_buckets = [0] * _HANDSHAKE_BUCKETS
        self.handshake_sum = 0.0
        self.proxy_headers = 0
        self.proxy_failures = [0] * len(PROXY_FAILURES)
        self.per_client_unchecked = 0
        self.per_client_refused = [0] * len(PER_CLIENT_REASONS)

    def count_per_client_refusal(self, reason: str) -> None:
        self.per_client_refused[_PER_CLIENT_INDEX[reason]] += 1

    def observe_handshake(self, seconds: float) -> None:
        self.handshake_buckets[bisect_left(HANDSHAKE_BOUNDS, seconds)] += 1
        self.handshake_sum += seconds

    def count_handshake_failure(self, reason: str) -> None:
        self.tls_failures[_FAILURE_INDEX.get(reason, _FAILURE_INDEX["other"])] += 1

    def count_proxy_failure(self, reason: str) -> None:
        self.proxy_failures[_PROXY_INDEX[reason]] += 1

    def observe_latency(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound falls in that bucket (Prometheus "le").
        self.latency_buckets[bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self.latency_sum += seconds

    def publish(self, board: StatsBoard, slot: int) -> None:
        """Copy every counter into `slot` of the shared board (about once a second)."""
        rules = board.max_rules
        faults = self.faults[:rules]
        faults += [0] * (rules - len(faults))  # fewer rules than the board has room for
        per_listener = [getattr(counts, name) for counts in self.listeners[:MAX_LISTENERS]
                        for name in _PER_LISTENER]
        per_listener += [0] * (_LISTENER_FIELDS - len(per_listener))
        board.write(slot, (
            self.connections_open, self.connections_total, self.transactions,
            self.messages_accepted, self.bytes_received, self.tls_sessions,
            self.tls_discarded_bytes, self.proxy_headers, self.auth_successes,
            self.auth_failures, self.auth_temporary_failures, self.per_client_unchecked,
            *self.latency_buckets, self.latency_sum, *self.tls_failures,
            *self.handshake_buckets, self.handshake_sum, *self.proxy_failures,
            *self.per_client_refused, *self.replies[_FIRST_CODE:_FIRST_CODE + _CODES], *faults, *per_listener,
        ))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One slot's counters as last published."""

    connections_open: int
    connections_total: int
    transactions: int
    messages_accepted: int
    bytes_received: int
    tls_sessions: int
    tls_discarded_bytes: int
    proxy_headers: int
    auth_successes: int
    auth_failures: int
    auth_temporary_failures: int
    per_client_unchecked: int
    latency_buckets: tuple[int, ...]  # per bucket, not cumulative; the last is +Inf
    latency_sum: float
    tls_failures: tuple[int, ...]  # by HANDSHAKE_FAILURES
    handshake_buckets: tuple[int, ...]
    handshake_sum: float
    proxy_failures: tuple[int, ...]  # by PROXY_FAILURES
    per_client_refused: tuple[int, ...]  # by PER_CLIENT_REASONS
    rejections: dict[int, int]  # reply code -> count, nonzero only
    faults: tuple[int, ...]  # by rule index (FaultRule.index)
    listeners: tuple[int, ...] = ()  # _PER_LISTENER for each listener, by its place


@dataclass(slots=True)
class Totals:
    """Counters summed over workers; `workers` is set by whoever sums live slots."""

    workers: int = 0
    connections_open: int = 0
    connections_total: int = 0
    transactions: int = 0
    messages_accepted: int = 0
    bytes_received: int = 0
    tls_sessions: int = 0
    tls_discarded_bytes: int = 0
    proxy_headers: int = 0
    latency_buckets: list[int] = field(default_factory=lambda: [0] * _BUCKETS)
    latency_sum: float = 0.0
    tls_failures: list[int] = field(default_factory=lambda: [0] * len(HANDSHAKE_FAILURES))
    handshake_buckets: list[int] = field(default_factory=lambda: [0] * _HANDSHAKE_BUCKETS)
    handshake_sum: float = 0.0
    proxy_failures: list[int] = field(default_factory=lambda: [0] * len(PROXY_FAILURES))
    rejections: dict[int, int] = field(default_factory=dict)
    faults: dict[RuleName, int] = field(default_factory=dict)  # nonzero only
    auth_successes: int = 0
    auth_failures: int = 0
    auth_temporary_failures: int = 0
    per_client_unchecked: int = 0
    per_client_refused: list[int] = field(default_factory=lambda: [0] * len(PER_CLIENT_REASONS))
    # Listener name -> [sessions, messages accepted]: by name, which a reload keeps.
    listeners: dict[str, list[int]] = field(default_factory=dict)

    def add(self, snapshot: Snapshot, *, gauges: bool = True,
            listener_names: Sequence[str] = (),
            rule_names: Sequence[RuleName] = ()) -> None:
        """Add a slot's counters; gauges=False for a worker that has gone.
        `listener_names`: that worker's listeners, in the order of its server.listen;
        `rule_names`: its fault rules' labels, by rule index."""
        for name in _COUNTERS:
            if gauges or name not in _GAUGES:
                setattr(self, name, getattr(self, name) + getattr(snapshot, name))
        for mine, theirs in ((self.latency_buckets, snapshot.latency_buckets),
                             (self.tls_failures, snapshot.tls_failures),
                             (self.handshake_buckets, snapshot.handshake_buckets),
                             (self.proxy_failures, snapshot.proxy_failures),
                             (self.per_client_refused, snapshot.per_client_refused)):
            for index, count in enumerate(theirs):
                mine[index] += count
        self.latency_sum += snapshot.latency_sum
        self.handshake_sum += snapshot.handshake_sum
        for code, count in snapshot.rejections.items():
            self.rejections[code] = self.rejections.get(code, 0) + count
        for name, count in zip(rule_names, snapshot.faults):
            if count:
                self.faults[name] = self.faults.get(name, 0) + count
        width = len(_PER_LISTENER)
        for index, name in enumerate(listener_names[:MAX_LISTENERS]):
            mine = self.listeners.setdefault(name, [0] * width)
            for offset, count in enumerate(snapshot.listeners[index * width:][:width]):
                mine[offset] += count

    def copy(self) -> Totals:
        """A copy whose lists and dicts are its own, down to the per-listener lists."""
        return Totals(**{f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)})


class StatsBoard:
    """One fixed-size slot of counters per worker, in memory shared across fork."""

    def __init__(self, slots: int, max_rules: int) -> None:
        self.slots = slots
        self.max_rules = max_rules
        # "=": no padding; every field is 8 bytes, so each lands on an 8-byte boundary.
        self._body = struct.Struct(
            f"={len(_COUNTERS) + _BUCKETS}Qd{len(HANDSHAKE_FAILURES) + _HANDSHAKE_BUCKETS}Qd"
            f"{len(PROXY_FAILURES) + len(PER_CLIENT_REASONS) + _CODES + max_rules}Q"
            f"{_LISTENER_FIELDS}Q")
        self._stride = _SEQ.size + self._body.size
        self._map = mmap.mmap(-1, max(1, slots * self._stride))  # anonymous, shared

    def write(self, slot: int, values: tuple[int | float, ...]) -> None:
        """Store a slot's values in layout order (WorkerStats.publish builds them)."""
        offset = slot * self._stride
        seq = _SEQ.unpack_from(self._map, offset)[0]
        _SEQ.pack_into(self._map, offset, seq + 1)  # odd: write in progress
        self._body.pack_into(self._map, offset + _SEQ.size, *values)
        _SEQ.pack_into(self._map, offset, seq + 2)

    def read(self, slot: int) -> Snapshot:
        offset = slot * self._stride
        values: tuple[Any, ...] = ()
        for _ in range(_READ_TRIES):
            before = _SEQ.unpack_from(self._map, offset)[0]
            values = self._body.unpack_from(self._map, offset + _SEQ.size)
            if before % 2 == 0 and _SEQ.unpack_from(self._map, offset)[0] == before:
                break
        items = iter(values)

        def take(count: int) -> tuple[Any, ...]:
            return tuple(next(items) for _ in range(count))

        counters = dict(zip(_COUNTERS, take(len(_COUNTERS))))
        latency_buckets, latency_sum = take(_BUCKETS), next(items)
        tls_failures = take(len(HANDSHAKE_FAILURES))
        handshake_buckets, handshake_sum = take(_HANDSHAKE_BUCKETS), next(items)
        proxy_failures = take(len(PROXY_FAILURES))
        per_client_refused = take(len(PER_CLIENT_REASONS))
        codes = take(_CODES)
        return Snapshot(
            **counters, latency_buckets=latency_buckets, latency_sum=latency_sum,
            tls_failures=tls_failures, handshake_buckets=handshake_buckets,
            handshake_sum=handshake_sum, proxy_failures=proxy_failures,
            per_client_refused=per_client_refused, rejections={_FIRST_CODE + i: count for i, count in enumerate(codes) if count},
            faults=take(self.max_rules), listeners=tuple(items),
        )

    def clear(self, slot: int) -> None:
        start = slot * self._stride
        self._map[start:start + self._stride] = bytes(self._stride)

    def retire(self, slot: int, retired: Totals, listener_names: Sequence[str] = (),
               rule_names: Sequence[RuleName] = ()) -> None:
        """Fold the counters of an exited worker's slot into `retired`, then clear it.
        `listener_names`, `rule_names`: those of the configuration the worker ran with.

        Call after reaping the worker and before the slot is given to a new one.
        """
        retired.add(self.read(slot), gauges=False, listener_names=listener_names,
                    rule_names=rule_names)
        self.clear(slot)

    def totals(self, live_slots: list[int], retired: Totals,
               listener_names: Mapping[int, Sequence[str]] | None = None,
               rule_names: Mapping[int, Sequence[RuleName]] | None = None) -> Totals:
        """`retired` plus every live slot, with `workers` = the number of live slots;
        `listener_names` and `rule_names` by slot: those of each worker's configuration."""
        totals = retired.copy()
        for slot in live_slots:
            totals.add(self.read(slot),
                       listener_names=() if listener_names is None else listener_names[slot],
                       rule_names=() if rule_names is None else rule_names[slot])
        totals.workers = len(live_slots)
        return totals

    def close(self) -> None:
        self._map.close()

