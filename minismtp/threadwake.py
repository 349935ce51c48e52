"""Waking a worker's loop from a thread beside it (group commits, AUTH checks).

Untrusted input: none; a byte between two ends of a socketpair this process made.

The loop selects on `sock`; a thread calls `notify()` after it has put results where the
loop takes them, and the loop calls `drain()` before taking them, so a notification
never outlives the results it announced. Many notifications may collapse into one byte
in flight: the loop takes everything there is when it wakes.
"""

from __future__ import annotations

import socket


class ThreadWakeup:
    def __init__(self) -> None:
        self.sock, self._notify = socket.socketpair()  # the loop selects on `sock`
        self.sock.setblocking(False)
        self._notify.setblocking(False)

    def notify(self) -> None:
        """From the thread: wake the loop (never blocks)."""
        try:
            self._notify.send(b"!")
        except (BlockingIOError, InterruptedError):
            pass  # a wakeup is already pending: the loop will take everything

    def drain(self) -> None:
        """From the loop, before taking the results: forget the notifications."""
        try:
            while self.sock.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def close(self) -> None:
        self.sock.close()
        self._notify.close()
