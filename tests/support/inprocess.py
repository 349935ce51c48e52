"""A real Worker in the test's own process, for tests of the loop's parts: its listener
never listens (sessions are handed in over socketpairs with `_start_sessions`), and
everything it opened is closed afterwards."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

from minismtp.config import load_config
from minismtp.delivery.base import Backend
from minismtp.delivery.null import DiscardBackend
from minismtp.heartbeat import HeartbeatBoard
from minismtp.stats import StatsBoard
from minismtp.worker import Worker


@contextmanager
def worker_in_process(overrides: dict[str, object] | None = None,
                      backend: Backend | None = None) -> Iterator[Worker]:
    """A Worker of the default configuration with `overrides`, storing into `backend`
    (discarding by default)."""
    config = load_config(overrides={"server.listen": ["127.0.0.1:0"], **(overrides or {})})
    listener = socket.socket()
    beats, board = HeartbeatBoard(1), StatsBoard(1, 8)
    worker = Worker(config, [(listener, config.server.listen[0])],
                    backend or DiscardBackend(), beats, 0, board)
    try:
        yield worker
    finally:
        for session in list(worker.sessions.values()):
            worker.close(session, "")
        worker.storage.close()
        worker.poller.close()
        worker.wakeup.close()
        listener.close()
        beats.close()
        board.close()
