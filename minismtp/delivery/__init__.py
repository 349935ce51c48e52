"""Message storage: pick a backend from config; the worker opens one sink per message.

Untrusted input: none handled here; see `maildir` (envelope strings become header text
and directory names) and `null` (everything ignored).
"""

from __future__ import annotations

from .base import Backend, DeliveryError, Peer, Sink
from .maildir import MaildirBackend
from .null import DiscardBackend

__all__ = [
    "BACKENDS", "LAYOUTS", "Backend", "DeliveryError", "Peer", "Sink", "make_backend",
]

BACKENDS = ("maildir", "discard")
LAYOUTS = ("single", "per_recipient")  # Maildir at delivery.path, or one per recipient


def make_backend(backend: str, path: str, fsync: bool, layout: str, hostname: str) -> Backend:
    """Build the configured backend; `path`, `fsync` and `layout` matter only for Maildir.

    Raises ValueError for an unknown backend or layout (config validates both first).
    """
    if backend == "maildir":
        if layout not in LAYOUTS:
            raise ValueError(f"unknown delivery layout {layout!r}; expected one of {LAYOUTS}")
        return MaildirBackend(path, fsync=fsync, layout=layout, hostname=hostname)
    if backend == "discard":
        return DiscardBackend()
    raise ValueError(f"unknown delivery backend {backend!r}; expected one of {BACKENDS}")
