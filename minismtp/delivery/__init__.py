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


def make_backend(backend: str, path: str, fsync: bool, layout: str, hostname: str,
                 **maildir: object) -> Backend:
    """Build the configured backend; `path`, `fsync`, `layout` and the `maildir` keywords
    (line_endings, envelope_recipients, group, file_mode, dir_mode: MaildirBackend's)
    matter only for Maildir.

    Raises ValueError for an unknown backend or layout (config validates both first),
    DeliveryError for a group that does not exist.
    """
    if backend == "maildir":
        if layout not in LAYOUTS:
            raise ValueError(f"unknown delivery layout {layout!r}; expected one of {LAYOUTS}")
        return MaildirBackend(path, fsync=fsync, layout=layout, hostname=hostname,
                              **maildir)  # type: ignore[arg-type]
    if backend == "discard":
        return DiscardBackend()
    raise ValueError(f"unknown delivery backend {backend!r}; expected one of {BACKENDS}")
