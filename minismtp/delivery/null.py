"""Discard delivery: accept every message and store nothing (the load-test fast path).

Untrusted input: the envelope and the body; both are ignored, only byte counts are kept.
"""

from __future__ import annotations

import itertools
import os

from ..smtp.events import Envelope
from .base import Backend, Peer, Sink

__all__ = ["DiscardBackend", "DiscardSink"]

# Queue ids are "D<pid hex>.<counter hex>": unique among live processes on this host.
# The prefix is rebuilt in each forked child, which would otherwise inherit the parent's.
_prefix = f"D{os.getpid():x}."
_counter = itertools.count(1)


def _after_fork() -> None:
    global _prefix, _counter
    _prefix = f"D{os.getpid():x}."
    _counter = itertools.count(1)


os.register_at_fork(after_in_child=_after_fork)


class DiscardSink(Sink):
    """Counts the bytes of one message and forgets them."""

    __slots__ = ("_backend", "nbytes")

    def __init__(self, backend: DiscardBackend) -> None:
        self._backend = backend
        self.nbytes = 0

    def write(self, data: memoryview | bytes) -> None:
        self.nbytes += len(data)

    def commit(self) -> str:
        backend = self._backend
        backend.messages += 1
        backend.nbytes += self.nbytes
        return f"{_prefix}{next(_counter):x}"

    def abort(self) -> None:
        self.nbytes = 0


class DiscardBackend(Backend):
    """Keeps per-process totals of committed messages and bytes, nothing else."""

    __slots__ = ("messages", "nbytes")

    def __init__(self) -> None:
        self.messages = 0
        self.nbytes = 0

    def prepare(self) -> None:
        pass

    def open(self, envelope: Envelope, peer: Peer, hostname: str | None = None) -> DiscardSink:
        return DiscardSink(self)

    def close(self) -> None:
        pass
