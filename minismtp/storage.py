"""A message's whole life in a worker: its sink opened at DATA, written chunk by chunk,
then committed (on the group-commit thread where that waits for the disk) or aborted.

Untrusted input: body chunks (borrowed views of the receive buffer, handed to the sink at
once and never kept) and envelope strings, which the backend treats as hostile.

Only this module calls a sink, so "a 250 means the message is stored" is decided in one
place: `commit` gives the queue id or the DeliveryError, at once or, where the commit
waits for the disk, later through `take_done` (the session is paused meanwhile).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from minismtp.delivery import Backend, DeliveryError
from minismtp.delivery.group import GroupCommitter

if TYPE_CHECKING:
    import socket

    from minismtp.session import Session

log = logging.getLogger("minismtp.worker")

Result = str | DeliveryError  # a queue id, or why the message is not stored


class Storage:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._committer: GroupCommitter[Session] | None = (
            GroupCommitter(backend) if backend.commit_blocks else None)

    @property
    def wakeup(self) -> socket.socket | None:
        """Readable when deferred commits are done (None: commits never wait)."""
        return None if self._committer is None else self._committer.wakeup

    def open(self, session: Session) -> DeliveryError | None:
        """Start storing the message of `session.envelope`; the error (logged) if we
        cannot."""
        try:
            session.sink = self.backend.open(session.envelope, session.peer,
                                             session.profile.hostname)
        except DeliveryError as exc:
            log.error("cannot store message from %s: %s", session.peer.address, exc)
            return exc
        session.sink_error = None
        return None

    def write(self, session: Session, data: memoryview) -> None:
        sink = session.sink
        if sink is None:
            return  # nothing to store: refused, failed already, or over the size limit
        try:
            sink.write(data)
        except DeliveryError as exc:
            log.error("write failed for message from %s: %s", session.peer.address, exc)
            session.sink_error = exc  # read on to the end, then 451 (452: disk full)
            self.abort(session)

    def abort(self, session: Session) -> None:
        sink, session.sink = session.sink, None
        if sink is not None:
            sink.abort()

    def commit(self, session: Session) -> Result | None:
        """Store the finished message: its result now, or None if it comes later
        through `take_done` (the session is then paused until it does)."""
        sink, session.sink = session.sink, None
        if sink is None or session.sink_error is not None:
            return session.sink_error or DeliveryError("write failed")
        if self._committer is not None:
            session.paused = True  # the reply waits for the disk; other clients do not
            self._committer.submit(session, sink)
            return None
        try:
            return sink.commit()
        except DeliveryError as exc:
            return exc

    def take_done(self) -> list[tuple[Session, Result]]:
        """Deferred commits that finished; call when `wakeup` is readable."""
        assert self._committer is not None
        return self._committer.take_done()

    def stalled_for(self, now: float) -> float:
        """How long the deferred commit on the disk now has taken (0: none)."""
        since = None if self._committer is None else self._committer.committing_since
        return 0.0 if since is None else now - since

    def finish(self) -> None:
        """The worker exits: finish the deferred commits in flight, whose results
        `take_done` then gives, so their sessions get their replies before they close."""
        if self._committer is not None:
            self._committer.finish()

    def close(self) -> None:
        """Finish the commits in flight, then release the backend."""
        if self._committer is not None:
            self._committer.stop()
        self.backend.close()
