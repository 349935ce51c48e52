"""How many queued connections a worker takes from a shared listening socket per wake-up.

Untrusted input: none (the kernel's count of connections waiting to be accepted).

Every worker waiting on one listening socket is woken by new connections, and the first to
run used to drain the queue. Short sessions do not mind, but long ones stay where they
land: 20 kept-open sessions arriving together mostly went to one worker, which then did
all the work while the other idled (bench/ S5: 34,000 msgs/s against 47,000 to 50,000
with the sessions spread). So a worker takes a small part of its fair share of what is
queued, at least one: a sibling woken by the same connections gets the rest. When a queue
builds up (1,000 clients connecting at once, S4) the part grows with it, up to
ACCEPTS_PER_WAKEUP, so accepting keeps pace. With reuse_port the queue is the worker's
own and it takes what is there.
"""

from __future__ import annotations

import socket
import struct
import sys

ACCEPTS_PER_WAKEUP = 64  # at most, so a burst cannot hold the loop away from its sessions
SHARE_PART = 4  # take 1/SHARE_PART of this worker's fair share of the queue per wake-up

# Linux's struct tcp_info: for a listening socket tcpi_unacked is the accept queue length.
_TCP_INFO = getattr(socket, "TCP_INFO", None) if sys.platform.startswith("linux") else None
_UNACKED = struct.Struct("=I")
_UNACKED_OFFSET = 24  # after 8 one-byte fields and tcpi_rto, ato, snd_mss, rcv_mss
_INFO_BYTES = _UNACKED_OFFSET + _UNACKED.size


def queued(listener: socket.socket) -> int | None:
    """Connections waiting in `listener`'s accept queue; None where that cannot be read."""
    if _TCP_INFO is None:
        return None
    try:
        info = listener.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _INFO_BYTES)
    except OSError:
        return None
    if len(info) < _INFO_BYTES:
        return None
    return _UNACKED.unpack_from(info, _UNACKED_OFFSET)[0]


def accept_quota(pending: int | None, sharers: int) -> int:
    """How many to accept now, of `pending` queued, with `sharers` workers on the queue."""
    if pending is None or sharers <= 1:
        return ACCEPTS_PER_WAKEUP
    return max(1, min(ACCEPTS_PER_WAKEUP, pending // (SHARE_PART * sharers)))
