"""The delivery interface: a `Backend` opens one `Sink` per message being received.

Untrusted input: the `Envelope` (HELO name, sender, recipients) and the body bytes all come
from the client. Every backend must treat them as hostile: envelope strings may hold control
characters, path separators or anything else the protocol core let through.

Everything here runs inside a worker's single-threaded event loop, so a sink must be cheap:
`write()` gets views borrowed from the receive buffer, valid only during the call, and must
hand them to the OS (or drop them) at once, never keep or copy them.
"""

from __future__ import annotations

import errno as errnos
from abc import ABC, abstractmethod
from typing import NamedTuple

from ..smtp.events import Envelope

__all__ = ["Backend", "DeliveryError", "Peer", "Sink"]


class Peer(NamedTuple):
    """The remote end of a session, as the OS reported it (not as the client claims), or
    as a trusted load balancer's PROXY header gave it (proxyread.py).

    A named tuple rather than a frozen dataclass: one is made per connection, at a third
    of the cost."""

    address: str  # IP text, e.g. "127.0.0.1" or "::1"
    port: int


class DeliveryError(Exception):
    """A message could not be stored.

    Storage trouble is ours, so the answer is temporary and the client keeps the message
    and tries again later: `452 4.3.1` (`replies.STORAGE_FULL`) when the disk or a quota
    is full (`full`, from the `errno` of the failure), `451 4.3.0` (`replies.LOCAL_ERROR`)
    for anything else. The message text is for the log only: it may name local paths, so
    it must never be sent to the peer.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno  # of the OSError behind it, if any

    @property
    def full(self) -> bool:
        return self.errno in _FULL


_FULL = frozenset({errnos.ENOSPC, errnos.EDQUOT})


class Sink(ABC):
    """One message being received.

    Call order: `write()` any number of times, then exactly one of `commit()` or `abort()`.
    After a failed `write()` later writes are ignored and `commit()` raises; `abort()` is
    always safe, including twice or after a failed `write()`/`commit()`.
    """

    __slots__ = ()

    @abstractmethod
    def write(self, data: memoryview | bytes) -> None:
        """Append a body segment; `data` is borrowed and must not be kept. Callers never
        split a CRLF between two calls (the core's body pieces never do), so a sink may
        change line endings one segment at a time.

        Raises DeliveryError on failure (and drops what was written).
        """

    @abstractmethod
    def commit(self) -> str:
        """Make the message durable and return its queue id (printable ASCII, no spaces).

        Raises DeliveryError on failure; then nothing of the message remains visible.
        """

    @abstractmethod
    def abort(self) -> None:
        """Drop everything written so far. Never raises."""


class Backend(ABC):
    """A place where messages are stored; one instance per process, made from config."""

    __slots__ = ()

    # True when commit() waits for the disk (fsync): the worker then commits off its
    # event loop, in batches through commit_many(), instead of blocking every client.
    commit_blocks = False

    def commit_many(self, sinks: list[Sink]) -> list[str | DeliveryError]:
        """Commit several messages; per message, its queue id or the error. Never raises.

        Backends whose commits wait for the disk share that wait across the batch.
        """
        results: list[str | DeliveryError] = []
        for sink in sinks:
            try:
                results.append(sink.commit())
            except DeliveryError as exc:
                results.append(exc)
        return results

    @abstractmethod
    def prepare(self) -> None:
        """Check and set up storage once, in the master, before workers are forked.

        Raises DeliveryError with a message naming the unusable path.
        """

    @abstractmethod
    def open(self, envelope: Envelope, peer: Peer, hostname: str | None = None) -> Sink:
        """Start storing one message; `hostname`: the name its Received: header gives
        the receiving host (the session's listener's), None: the backend's own. Raises
        DeliveryError if it cannot be started."""

    @abstractmethod
    def close(self) -> None:
        """Release whatever the backend holds open. Never raises."""
