"""How many connections a worker may take from a listening queue it shares with siblings.

Untrusted input: none (session counts that workers publish on the heartbeat board, and
the kernel's count of connections waiting to be accepted).

Every worker waiting on one listening socket is woken by a new connection, and the first
to run used to drain the queue. Short sessions do not mind where they land, but long ones
stay there: when 20 kept-open sessions opened together all went to one worker (a third
of bench/ S2's rounds), that worker did all the work while the other idled, and such
rounds ran markedly slower (figures in bench/README.md).

So a worker takes freely while it holds at most MARGIN sessions more than its lightest
sibling. Beyond that it reads the queue's length and takes up to its even share of all
sessions, held and waiting. Beyond its share, with a burst waiting, it leaves the queue
to the others for DEFER_S, showing itself as not accepting meanwhile (so two workers
never wait for each other, and a sibling takes the rest). Whatever is still queued when
the time is up it takes after all: a sibling that is busy or stuck delays a burst by
DEFER_S at most. The wait is long enough for a sibling that does not preempt (worker.py's
SCHED_BATCH) to get a CPU; at 2 ms the burst still often went back to the first worker.
Without a burst a worker takes what is there: short sessions arrive a few at a time, and
leaving each to a sibling not yet running halved bench/ S1's rate.
With reuse_port each worker has a queue of its own, and this does not apply.
"""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Callable

MARGIN = 4  # sessions a worker may hold above its lightest sibling
BURST = 8  # queued connections that make a burst
DEFER_S = 0.02  # how long a worker leaves the queue to a lighter sibling
MAX_AGE_S = 3.0  # a sibling whose heartbeat is older may be stuck: do not wait for it

# Linux's struct tcp_info: for a listening socket tcpi_unacked is the accept queue length.
_TCP_INFO = getattr(socket, "TCP_INFO", None) if sys.platform.startswith("linux") else None
_UNACKED = struct.Struct("=I")
_UNACKED_OFFSET = 24  # after 8 one-byte fields and tcpi_rto, ato, snd_mss, rcv_mss
_INFO_BYTES = _UNACKED_OFFSET + _UNACKED.size


def accept_room(mine: int, lightest: int | None, most: int) -> int:
    """How many to accept now, holding `mine` sessions, of at most `most` (0: maybe defer)."""
    if lightest is None:
        return most
    return max(0, min(most, lightest + MARGIN - mine))


def share_room(mine: int, others_total: int, others: int, waiting: int) -> int:
    """Room up to this worker's even share of all sessions, held and `waiting` (may be <= 0),
    with `others` accepting siblings holding `others_total`."""
    share = -(-(others_total + mine + waiting) // (others + 1))  # rounded up
    return share - mine


def how_many(mine: int, siblings: tuple[int | None, int, int],
             waiting: Callable[[], int | None], most: int) -> int:
    """The whole rule (module docstring): how many to accept now, of at most `most`; 0 means
    leave the queue to the siblings for DEFER_S. `siblings` is HeartbeatBoard.siblings();
    `waiting()` reads the queue's length (a syscall), only once ahead of a sibling."""
    lightest, others_total, others = siblings
    room = accept_room(mine, lightest, most)
    if room:
        return room
    queue = waiting()
    if queue is None:
        return most  # cannot tell: as without balancing
    room = share_room(mine, others_total, others, queue)
    if room > 0:
        return min(most, room)
    return 0 if queue >= BURST else most


def queued(listener: socket.socket) -> int | None:
    """Connections waiting in `listener`'s accept queue; None where that cannot be read."""
    if _TCP_INFO is None:
        return None
    try:
        info = listener.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _INFO_BYTES)
    except OSError:
        return None
    return _UNACKED.unpack_from(info, _UNACKED_OFFSET)[0] if len(info) >= _INFO_BYTES else None
