"""Signals delivered as bytes on a socket that an event loop selects on.

Untrusted input: none; the kernel's signal numbers.

The handlers only raise a flag: `signal.set_wakeup_fd` has the interpreter write each
signal's number to our socketpair, and the loop reads and dispatches them in its own time
(asyncio's pattern). The flag lets a loop look before an action that a signal may change,
such as accepting a connection just as a stop arrives. WARNING: never log or do other
work in a signal handler: a lock held by the interrupted code (logging's, malloc's) would
deadlock the process.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterable


class SignalWakeup:
    def __init__(self) -> None:
        self.sock, self._notify = socket.socketpair()  # the loop selects on `sock`
        for end in (self.sock, self._notify):
            end.setblocking(False)

    def install(self, signums: Iterable[int]) -> None:
        """Route `signums` to `sock` from now on."""
        for signum in signums:
            signal.signal(signum, _do_nothing)
        signal.set_wakeup_fd(self._notify.fileno(), warn_on_full_buffer=False)

    @staticmethod
    def pending() -> bool:
        """Whether a signal arrived since the last `read()`."""
        return _arrived

    def read(self) -> bytes:
        """The signal numbers that arrived, one byte each (empty if none)."""
        global _arrived
        _arrived = False  # before reading: one arriving meanwhile raises it again
        try:
            return self.sock.recv(256)
        except (BlockingIOError, InterruptedError):
            return b""

    def close(self, signums: Iterable[int] = ()) -> None:
        """Stop routing, give `signums` their default action, close the sockets."""
        signal.set_wakeup_fd(-1)
        for signum in signums:
            signal.signal(signum, signal.SIG_DFL)
        self.sock.close()
        self._notify.close()


_arrived = False


def _do_nothing(signum: int, frame: object) -> None:
    """Only the flag: the wakeup fd tells the loop (see the module docstring)."""
    global _arrived
    _arrived = True
