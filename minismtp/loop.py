"""What a worker's event loop offers the modules that serve its sessions.

`output.py` (replies going out) and `decisions.py` (answers to the core's decision
events) act on sessions but never see the Worker: they get this interface, so each can
be driven by a small fake in tests and nothing below the loop imports it back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from minismtp.poller import READ, WRITE

if TYPE_CHECKING:
    from minismtp.session import Session
    from minismtp.timers import Timers

__all__ = ["READ", "WRITE", "Loop"]


class Loop(Protocol):
    now: float  # the loop's clock, read once per wake-up
    timers: Timers
    stopping: bool  # the worker stops: no new session is greeted

    def want(self, session: Session, mask: int) -> None:
        """Watch the session's connection for READ, WRITE, or nothing (0)."""

    def resume(self, session: Session) -> None:
        """Run the core on what is buffered, act on its events, send the replies."""

    def read(self, session: Session) -> None:
        """Read what the connection has (as when it is readable), then resume."""

    def read_soon(self, session: Session) -> None:
        """On the loop's next turn, read as if the connection were readable (TLS: bytes
        wait decrypted inside OpenSSL, which select() does not see)."""

    def start_tls(self, session: Session) -> None:
        """The 220 to STARTTLS went out whole: start the handshake."""

    def close(self, session: Session, reason: str) -> None:
        """Close the connection at once and forget the session."""

    def data_started(self, session: Session) -> None:
        """The body begins: DATA's deadlines apply from now."""
