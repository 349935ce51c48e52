"""Group commit: durable commits run on one thread beside the worker's event loop.

Untrusted input: none; this moves finished messages from the event loop to the disk.

An fsync takes milliseconds, and a worker that waited for one per message would stall
every other client meanwhile. Instead the loop hands finished messages to this thread and
goes on serving; the thread commits whatever has queued up as one batch (the backend
shares the waits across it, see `Backend.commit_many`) and wakes the loop through a
socket, which then sends each 250, or 451 (452 on a full disk) for a message that could
not be stored. The
GIL is released while the thread waits for the disk.
"""

from __future__ import annotations

import threading
import time
from typing import Generic, TypeVar

from ..threadwake import ThreadWakeup
from .base import Backend, DeliveryError, Sink

Tag = TypeVar("Tag")  # what the loop needs back with each result (its session)


class GroupCommitter(Generic[Tag]):
    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._cond = threading.Condition()
        self._queued: list[tuple[Tag, Sink]] = []
        self._done: list[tuple[Tag, str | DeliveryError]] = []
        self._stopping = False
        # When the batch on the disk now began (monotonic), else None: read by the loop
        # to tell a disk that has stopped answering (one attribute: no lock needed).
        self.committing_since: float | None = None
        self._wake = ThreadWakeup()
        self.wakeup = self._wake.sock  # the loop selects on it
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()

    def submit(self, tag: Tag, sink: Sink) -> None:
        with self._cond:
            self._queued.append((tag, sink))
            self._cond.notify()

    def take_done(self) -> list[tuple[Tag, str | DeliveryError]]:
        """Results ready for the loop; call when `wakeup` is readable."""
        self._wake.drain()
        with self._cond:
            done, self._done = self._done, []
        return done

    def finish(self) -> None:
        """Finish every queued commit and end the thread; `take_done` still has their
        results. Nothing may be submitted after."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def stop(self) -> None:
        """`finish`, and release the wakeup (results not taken are dropped)."""
        self.finish()
        self._wake.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queued and not self._stopping:
                    self._cond.wait()
                batch, self._queued = self._queued, []
                if not batch and self._stopping:
                    return
            self.committing_since = time.monotonic()
            results = self._backend.commit_many([sink for _, sink in batch])
            self.committing_since = None
            with self._cond:
                self._done.extend(zip((tag for tag, _ in batch), results))
            self._wake.notify()
