"""A client connection as a worker sees it, and the core settings its connections share.

Untrusted input: none here; a Session only holds what the worker and the core made of
the client's bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from minismtp import authcheck
from minismtp.config import Config, Listener
from minismtp.delivery import Peer, Sink
from minismtp.smtp.events import Envelope
from minismtp.smtp.protocol import Settings, SmtpServerConnection

if TYPE_CHECKING:
    from minismtp.handshake import Handshake
    from minismtp.proxyread import ProxyRead
    from minismtp.transport import PlainTransport


def protocol_settings(config: Config, listener: Listener | None = None, *,
                      tls: bool = True) -> Settings:
    """The core's settings for connections from `listener` (None: plaintext, no STARTTLS,
    no AUTH). An implicit TLS listener offers no STARTTLS: its sessions start with
    tls_started(). `tls` False: no TLS context, so no STARTTLS whatever the listener says
    (AUTH stays as configured; without TLS, config.py admits it only with allow_plaintext)."""
    limits = config.limits
    starttls = tls and listener is not None and listener.tls == "starttls"
    return Settings(
        starttls=starttls,
        require_tls=starttls and listener.require_tls,
        hostname=config.server.hostname,
        max_message_bytes=limits.max_message_size,
        max_recipients=limits.max_recipients,
        max_command_bytes=limits.max_command_length,
        max_errors=limits.max_errors,
        max_junk_commands=limits.max_junk_commands,
        bare_lf=limits.bare_lf,
        command_buffer_bytes=max(4096, 2 * limits.max_command_length),
        **({} if listener is None else authcheck.core_settings(listener.auth)),
    )


class Session:
    """One client connection: transport, protocol state, message in progress, timers."""

    __slots__ = (
        "transport", "fd", "conn", "peer", "handshake", "preamble", "sink", "sink_failed", "mask", "deadline", "timer_at",
        "data_started", "data_bytes", "envelope", "size", "end_seen", "paused",
        "tarpit_bps", "trickling", "lingering", "closed", "end", "client_entry",
    )

    def __init__(self, transport: PlainTransport, conn: SmtpServerConnection, peer: Peer
                 ) -> None:
        self.transport = transport
        self.fd = transport.fileno()  # the same for the connection's life, TLS or not
        self.handshake: Handshake | None = None  # while a TLS handshake runs
        self.preamble: ProxyRead | None = None  # while a PROXY header is read
        self.conn = conn
        self.peer = peer
        self.sink: Sink | None = None  # opened, written and closed by storage.py only
        self.sink_failed = False
        self.mask = 0  # what the loop's selector watches for: READ, WRITE or 0
        self.deadline = 0.0
        self.timer_at = float("inf")  # earliest live timer entry (see timers.py)
        self.data_started = 0.0
        self.data_bytes = 0
        self.envelope: Envelope | None = None  # of the message in DATA
        self.size = 0  # of the message just ended
        self.end_seen = 0.0  # when its terminator arrived
        self.paused = False  # a decision is deferred (delay, commit): do not read
        self.tarpit_bps = 0.0  # send the next reply this slowly (a fault rule)
        self.trickling = False
        self.lingering = False  # last reply sent, write side shut: draining until EOF
        self.closed = False
        self.end = ""  # how the session ended, when the worker decided it (the log's end=)
        self.client_entry = -1  # its client's entry in the per-client table while counted there
