"""A worker's listening sockets: when to accept, how many, and when to leave them alone.

Untrusted input: none here (what accepted clients send is the sessions' business).

How many: at most MOST_PER_WAKEUP a wake-up, and at most the room under the worker's
connection cap plus REFUSALS_PER_WAKEUP, the ones the worker refuses at once.

Three reasons not to accept, each with the listeners out of the selector so that a full
queue cannot make the loop spin:
- out of file descriptors or memory, or an accept error nobody expects: pause, and
  listen again at a tick after PAUSE_S (an unexpected error MOST_ODD_ERRORS times in a
  row ends the worker instead: the master starts another, with sockets of its own);
- a lighter sibling on the same queue while a burst waits (balance.py): defer for
  balance.DEFER_S, then take whatever is still queued;
- a stop: the listeners are closed and siblings (or the next generation) take the queue.
Siblings read this worker's session count on the heartbeat board, or NOT_ACCEPTING
whenever it is not listening (so two workers never defer to each other).

The acceptor knows no Worker: it gets the poller, the collection of sessions held (only
its size is read) and a callback that reads pending signals, and hands back the sockets
it accepted. A listener's owner in the poller is a `Listening`.
"""

from __future__ import annotations

import _socket
import errno
import logging
import socket
import time
from collections.abc import Callable, Sized

from minismtp import balance
from minismtp.heartbeat import NOT_ACCEPTING, HeartbeatBoard
from minismtp.listeners import is_listening
from minismtp.poller import READ, Poller

log = logging.getLogger("minismtp.worker")
# accept(2): the connection went away before it was taken, or Linux passed on a network
# error of that connection; the next one may be fine, as for EAGAIN.
_CONNECTION_GONE = frozenset((
    errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT, errno.EHOSTDOWN,
    errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH, errno.EPERM,
))

# At most per wake-up: drain a burst quickly (a small quota cost S4 much of its rate, see
# bench/README.md) without holding the loop away from its sessions for long.
MOST_PER_WAKEUP = 64
# Beyond the worker's connection cap, at most this many more per wake-up, each to be refused
# (421) as soon as the batch is handed back: a queue of them must not use up the
# descriptors the cap leaves for message files (descriptors.py), and what is not taken
# now is at the next turn of the loop.
REFUSALS_PER_WAKEUP = 8
PAUSE_S = 0.5  # out of file descriptors: let the queue wait instead of spinning
MOST_ODD_ERRORS = 10  # unexpected accept errors in a row (5 s of pauses), then raised
_OUT_OF_RESOURCES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
# (connected socket, peer address, the listening socket it came from). The sockets are
# the C type `_socket.socket` that `socket.socket` wraps: the same methods the transports
# call, without the Python-level wrapper whose construction cost a few microseconds per
# connection (bench/README.md).
Accepted = list[tuple[_socket.socket, tuple, socket.socket]]


class Listening:
    """A listening socket, as the owner of its descriptor in the poller."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock


class Acceptor:
    def __init__(self, poller: Poller, listeners: list[socket.socket],
                 board: HeartbeatBoard, slot: int, balancing: bool, held: Sized,
                 read_signals: Callable[[], None], cap: int) -> None:
        self.poller = poller
        self.listeners = listeners
        self.board = board
        self.slot = slot
        self.balancing = balancing  # one queue shared with siblings (not reuse_port)
        self.held = held  # the worker's sessions: their number is our load
        self.cap = cap  # sessions the worker holds at most; beyond, it refuses
        self.read_signals = read_signals  # may stop us (close()) before we accept
        self.listening = False  # the listeners are in the selector
        self.stopped = False  # closed for good
        self.paused_until = 0.0  # out of descriptors: listen again at a tick after this
        self.odd_errors = 0  # unexpected accept errors since the last accept that worked
        self.deferred_until = 0.0  # left to the siblings until then

    def open_queues(self, backlog: int) -> None:
        """Make the sockets the master left bound but not listening (an address a reload
        added, a reuse_port group grown for this worker: listeners.py) listen, now that
        this worker is set up to accept: from listen() on the kernel gives such a socket
        its share of new connections, which must never wait on a worker that could not
        start. A socket already listening is left alone (its backlog may be newer than
        our config's)."""
        for listener in self.listeners:
            if not is_listening(listener):
                listener.listen(backlog)

    def refresh(self) -> None:
        """Listen exactly when nothing holds accepting back; tell the siblings."""
        wanted = not (self.paused_until or self.deferred_until or self.stopped)
        if wanted != self.listening:
            poller = self.poller
            for listener in self.listeners:
                if wanted:
                    poller.register(listener.fileno(), READ, Listening(listener))
                else:
                    poller.unregister(listener.fileno())
            self.listening = wanted
        self.publish_load()

    def publish_load(self) -> None:
        """Sessions held, for siblings sharing the queue; none while not taking more."""
        load = len(self.held) if self.listening else NOT_ACCEPTING
        self.board.loads[self.slot] = load

    def close(self) -> None:
        """Stop accepting for good (the worker is stopping): the queue is left to others."""
        self.stopped = True
        self.refresh()
        for listener in self.listeners:
            listener.close()
        self.listeners = []

    def tick(self, now: float) -> None:
        if self.paused_until and now >= self.paused_until:
            self.paused_until = 0.0
            self.refresh()

    def on_readable(self, listener: socket.socket, now: float) -> Accepted:
        if not self.listening:
            return []  # an event of this batch, from before a pause, deferral or stop
        most = MOST_PER_WAKEUP
        if self.balancing:
            siblings = self.board.siblings(self.slot, now, balance.MAX_AGE_S)
            most = balance.how_many(len(self.held), siblings,
                                    lambda: balance.queued(listener), most)
            if not most:
                self.deferred_until = now + balance.DEFER_S
                self.refresh()
                return []
        accepted: Accepted = []
        self._take(listener, most, accepted)
        return accepted

    def end_deferral(self) -> Accepted:
        """Take what the siblings left queued (they may be busy), then go on listening."""
        self.deferred_until = 0.0
        self.refresh()
        accepted: Accepted = []
        for listener in self.listeners:
            if not self.listening:
                break  # out of descriptors, or stopping
            self._take(listener, MOST_PER_WAKEUP, accepted)
        return accepted

    def _take(self, listener: socket.socket, most: int, accepted: Accepted) -> None:
        # A stop may be waiting in this same batch of events: a connection taken now
        # would only get 421 (and could have gone to a new worker instead).
        self.read_signals()
        if not self.listening:
            return
        family, kind, proto = listener.family, listener.type, listener.proto
        before = len(accepted)
        most = min(most, self.cap + REFUSALS_PER_WAKEUP - len(self.held) - before)
        for _ in range(most):
            try:
                fd, address = listener._accept()  # what socket.accept() does, minus its wrapper
                accepted.append((_socket.socket(family, kind, proto, fd), address, listener))
            except (BlockingIOError, InterruptedError):
                self.odd_errors = 0  # a listener that answers as listeners do
                return  # another worker won the race, or the queue is empty
            except OSError as exc:
                if exc.errno in _CONNECTION_GONE:
                    continue
                if exc.errno not in _OUT_OF_RESOURCES:
                    # A worker that raised would drop every session it holds: only a
                    # listener broken for good (EBADF, EINVAL...) is worth that, one that
                    # fails MOST_ODD_ERRORS times with no accept that works between.
                    self.odd_errors = 1 if len(accepted) > before else self.odd_errors + 1
                    if self.odd_errors >= MOST_ODD_ERRORS:
                        raise
                log.error("accept: %s; pausing accepts", exc.strerror or exc)
                self.paused_until = time.monotonic() + PAUSE_S
                self.refresh()
                return
        if len(accepted) > before:
            self.odd_errors = 0
