"""Signals noted by handlers that do nothing else, and a socket that wakes an event loop.

Untrusted input: none; the kernel's signal numbers.

A handler only counts its signal, and `signal.set_wakeup_fd` has the interpreter write a
byte to our socketpair, so that a loop waiting in select() wakes up; the loop then takes
the counts (`read()`) and acts in its own time (asyncio's pattern). The bytes only wake:
a burst fills the socket's small buffer and the rest are dropped, but the counts are kept
apart, so a TERM after a thousand HUPs still arrives (repeats of one signal may merge, as
the kernel merges them anyway). The counts also let a loop look before an action that a
signal may change, such as accepting a connection just as a stop arrives. WARNING: never
log or do other work in a signal handler: a lock held by the interrupted code (logging's,
malloc's) would deadlock the process.
"""

from __future__ import annotations

import signal
import socket
from collections import Counter
from collections.abc import Iterable

_WAKEUP_BYTES = 4096  # more than the socketpair's buffer holds: one read empties it

# The master's signals. `serve` blocks them first thing, and the master unblocks them
# once its handlers are in place and blocks them again when it is done: one arriving
# before or after would take its default action (TTIN and TTOU stop the process, HUP and
# USR1 end it, also during the interpreter's exit). Blocked, it waits for a handler, or
# is never delivered. USR1/USR2 are handled only to say that they do nothing here.
MASTER_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
                  signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2,
                  signal.SIGCHLD)
# Held from the first line of `serve` until the master's handlers are in: all but the
# stops, which keep their default action meanwhile, so that a start stuck on a slow
# disk or a user lookup can still be stopped with TERM or Ctrl-C.
HELD_AT_START = tuple(signum for signum in MASTER_SIGNALS
                      if signum not in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT))


class SignalWakeup:
    def __init__(self) -> None:
        self.sock, self._notify = socket.socketpair()  # the loop selects on `sock`
        for end in (self.sock, self._notify):
            end.setblocking(False)

    def install(self, signums: Iterable[int]) -> None:
        """Note `signums` and wake `sock` from now on."""
        for signum in signums:
            signal.signal(signum, _note)
        signal.set_wakeup_fd(self._notify.fileno(), warn_on_full_buffer=False)

    @staticmethod
    def pending() -> bool:
        """Whether a signal arrived since the last `read()`."""
        return bool(_noted)

    def read(self) -> Counter[int]:
        """How many of each signal arrived since the last call (empty if none)."""
        global _noted
        # Empty the socket first: a signal noted after this writes a byte that wakes the
        # loop again, so none waits unseen for the next timeout.
        try:
            self.sock.recv(_WAKEUP_BYTES)
        except (BlockingIOError, InterruptedError):
            pass
        # A handler runs between two steps of this code, never inside one: it counts
        # into the Counter taken here or into the new one, and each is read once.
        taken, _noted = _noted, Counter()
        return taken

    def close(self, signums: Iterable[int] = ()) -> None:
        """Stop routing, give `signums` their default action, close the sockets, and
        forget what was noted (a new worker must not act on the master's signals)."""
        global _noted
        signal.set_wakeup_fd(-1)
        for signum in signums:
            signal.signal(signum, signal.SIG_DFL)
        self.sock.close()
        self._notify.close()
        _noted = Counter()


_noted: Counter[int] = Counter()


def _note(signum: int, frame: object) -> None:
    """Only the count: the wakeup fd tells the loop (see the module docstring)."""
    _noted[signum] += 1
