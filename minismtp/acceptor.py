"""A worker's listening sockets: when to accept, how many, and when to leave them alone.

Untrusted input: none here (what accepted clients send is the sessions' business).

Three reasons not to accept, each with the listeners out of the selector so that a full
queue cannot make the loop spin:
- out of file descriptors: pause, and listen again at a tick after PAUSE_S;
- a lighter sibling on the same queue while a burst waits (balance.py): defer for
  balance.DEFER_S, then take whatever is still queued;
- a stop: the listeners are closed and siblings (or the next generation) take the queue.
Siblings read this worker's session count on the heartbeat board, or NOT_ACCEPTING
whenever it is not listening (so two workers never defer to each other).
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
        self.balancing = balancing  # one queue shared with siblings (not reuse_port)
        self.listening = False  # the listeners are in the selector
        self.paused_until = 0.0  # out of descriptors: listen again at a tick after this
        self.deferred_until = 0.0  # left to the siblings until then

    def refresh(self) -> None:
        """Listen exactly when nothing holds accepting back; tell the siblings."""
        wanted = not (self.paused_until or self.deferred_until or self.worker.stopping)
        if wanted != self.listening:
            sel = self.worker.sel
            for listener in self.listeners:
                if wanted:
                    sel.register(listener, selectors.EVENT_READ, LISTENER)
                else:
                    sel.unregister(listener)
            self.listening = wanted
        self.publish_load()

    def publish_load(self) -> None:
        """Sessions held, for siblings sharing the queue; none while not taking more."""
        load = len(self.worker.sessions) if self.listening else NOT_ACCEPTING
        self.board.loads[self.slot] = load

    def close(self) -> None:
        """Stop accepting for good (the worker is stopping): the queue is left to others."""
        self.refresh()
        for listener in self.listeners:
            listener.close()
        self.listeners = []

    def tick(self, now: float) -> None:
        if self.paused_until and now >= self.paused_until:
            self.paused_until = 0.0
            self.refresh()

    def on_readable(self, listener: socket.socket) -> None:
        if not self.listening:
            return  # an event of this batch, from before a pause, deferral or stop
        most = MOST_PER_WAKEUP
        if self.balancing:
            now = self.worker.now
            siblings = self.board.siblings(self.slot, now, balance.MAX_AGE_S)
            most = balance.how_many(len(self.worker.sessions), siblings,
                                    lambda: balance.queued(listener), most)
            if not most:
                self.deferred_until = now + balance.DEFER_S
                self.refresh()
                return
        self._take(listener, most)

    def end_deferral(self) -> None:
        """Take what the siblings left queued (they may be busy), then go on listening."""
        self.deferred_until = 0.0
        self.refresh()
        for listener in self.listeners:
            if not self.listening:
                break  # out of descriptors, or stopping
            self._take(listener, MOST_PER_WAKEUP)

    def _take(self, listener: socket.socket, most: int) -> None:
        worker = self.worker
        if worker.wakeup.pending():
            # A stop may be waiting in this same batch of events: a connection taken
            # now would only get 421 (and could have gone to a new worker instead).
            worker.read_signals()
            if not self.listening:
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
                    self.paused_until = time.monotonic() + PAUSE_S
                    self.refresh()
                    return
                raise
            worker.start_session(sock, addr)
