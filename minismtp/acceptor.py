"""A worker's listening sockets: when to accept, how many, and when to leave them alone.

Untrusted input: none here (what accepted clients send is the sessions' business).

Three reasons not to accept, each with the listeners out of the selector so that a full
queue cannot make the loop spin:
- out of file descriptors: pause, and listen again at a tick after PAUSE_S;
- a lighter sibling on the same queue while a burst waits (balance.py): defer for
  balance.DEFER_S, then take whatever is still queued;
- a stop: the listeners are closed and siblings (or the next generation) take the queue.
Siblings read this worker's session count on the heartbeat board, or NOT_ACCEPTING
while it is not listening (so two workers never defer to each other).
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import time
from typing import TYPE_CHECKING

from minismtp import balance
from minismtp.heartbeat import NOT_ACCEPTING, HeartbeatBoard

if TYPE_CHECKING:
    from minismtp.worker import Worker

log = logging.getLogger("minismtp.worker")

# At most per wake-up: drain a burst quickly (4 instead of 64 cost S4 in bench/ a third of
# its rate) without holding the loop away from its sessions for long.
MOST_PER_WAKEUP = 64
PAUSE_S = 0.5  # out of file descriptors: let the queue wait instead of spinning
LISTENER = object()  # selector data of a listening socket


class Acceptor:
    def __init__(self, worker: Worker, listeners: list[socket.socket], board: HeartbeatBoard,
                 slot: int, balancing: bool) -> None:
        self.worker = worker
        self.listeners = listeners
        self.board = board
        self.slot = slot
        self.loads = board.loads
        self.balancing = balancing  # one queue shared with siblings (not reuse_port)
        self.paused_until = 0.0  # out of descriptors: listen again at a tick after this
        self.deferred_until = 0.0  # left to a lighter sibling until then

    def listen(self) -> None:
        sel = self.worker.sel
        for listener in self.listeners:
            sel.register(listener, selectors.EVENT_READ, LISTENER)
        self.publish_load()

    def _unlisten(self) -> None:
        if not (self.paused_until or self.deferred_until):
            for listener in self.listeners:
                self.worker.sel.unregister(listener)

    def publish_load(self) -> None:
        """Sessions held, for siblings sharing the queue; none while not taking more."""
        idle = self.worker.stopping or self.paused_until or self.deferred_until
        self.loads[self.slot] = NOT_ACCEPTING if idle else len(self.worker.sessions)

    def close(self) -> None:
        """Stop accepting for good: the queue is left to the others."""
        self._unlisten()
        for listener in self.listeners:
            listener.close()
        self.listeners = []
        self.paused_until = self.deferred_until = 0.0
        self.publish_load()

    def tick(self, now: float) -> None:
        if self.paused_until and now >= self.paused_until:
            self.paused_until = 0.0
            self.listen()

    def on_readable(self, listener: socket.socket) -> None:
        most = MOST_PER_WAKEUP
        if self.balancing:
            worker = self.worker
            lightest = self.board.lightest_sibling(self.slot, worker.now, balance.MAX_AGE_S)
            most = balance.accept_room(len(worker.sessions), lightest, most)
            if not most:
                if balance.burst_waiting(listener):
                    self._unlisten()
                    self.deferred_until = worker.now + balance.DEFER_S
                    self.publish_load()  # deferring: the sibling must not wait for us
                    return
                most = MOST_PER_WAKEUP
        self._take(listener, most)

    def end_deferral(self) -> None:
        """Take what the siblings left queued (they may be busy), then listen again."""
        self.deferred_until = 0.0
        self.listen()
        for listener in self.listeners:
            if self.paused_until:
                break  # out of descriptors
            self._take(listener, MOST_PER_WAKEUP)

    def _take(self, listener: socket.socket, most: int) -> None:
        worker = self.worker
        if worker.wakeup.pending():
            # A stop may be waiting in this same batch of events: a connection taken
            # now would only get 421 (and could have gone to a new worker instead).
            worker.read_signals()
        if worker.stopping:
            return
        for _ in range(most):
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return  # another worker won the race, or the queue is empty
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept: %s; pausing accepts", exc.strerror)
                    self._pause()
                    return
                raise
            worker.start_session(sock, addr)

    def _pause(self) -> None:
        if not self.paused_until:
            self._unlisten()
            self.paused_until = time.monotonic() + PAUSE_S
            self.publish_load()
