"""Telling systemd how the server is doing (a `Type=notify` service): ready, reloading,
stopping, through the datagram socket named by `$NOTIFY_SOCKET` (sd_notify(3)).

Untrusted input: none; the socket's name comes from the service manager's environment.

The protocol is a few lines of `KEY=value` in one datagram; a path that starts with "@"
names a socket in the abstract namespace. Without `$NOTIFY_SOCKET` (not run by systemd)
every call does nothing. A notification that cannot be sent is logged at debug level
and forgotten: the server never waits for, or fails because of, its supervisor.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("minismtp.master")


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        if address and address[0] == "@":
            address = "\0" + address[1:]
        self._address = address or None
        self.ready = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, **fields: object) -> None:
        if self._address is None:
            return
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(message.encode(), self._address)
        except OSError as exc:
            log.debug("sd_notify to %r failed: %s", self._address, exc)

    def notify_ready(self, status: str) -> None:
        self.ready = True
        self.send(ready=1, status=status, mainpid=os.getpid())

    def notify_reloading(self) -> None:
        # systemd 253+ asks for the monotonic time with RELOADING=1 (Type=notify-reload).
        self.send(reloading=1, monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC)
                  // 1000, status="reloading")

    def notify_stopping(self) -> None:
        self.send(stopping=1, status="stopping")
