"""A client connection as a worker sees it, and what the connections of one listening
socket share (its Profile: core settings, deadlines, fault rules, counters).

Untrusted input: none here; a Session only holds what the worker and the core made of
the client's bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from minismtp import authcheck
from minismtp.config import Config, Listener
from minismtp.delivery import DeliveryError, Peer, Sink
from minismtp.profiles import effective_limits
from minismtp.smtp.events import Envelope
from minismtp.smtp.protocol import Settings, SmtpServerConnection
from minismtp.stats import ListenerCounts

if TYPE_CHECKING:
    from minismtp.decisions import Decisions
    from minismtp.handshake import Handshake
    from minismtp.output import TarpitSpan
    from minismtp.proxyread import ProxyRead
    from minismtp.transport import PlainTransport
    from minismtp.values import ProxyProtocol


def protocol_settings(config: Config, listener: Listener | None = None, *,
                      tls: bool = True) -> Settings:
    """The core's settings for connections from `listener` (None: plaintext, no STARTTLS,
    no AUTH). An implicit TLS listener offers no STARTTLS: its sessions start with
    tls_started(). `tls` False: no TLS context, so no STARTTLS whatever the listener says
    (AUTH stays as configured; without TLS, config.py admits it only with allow_plaintext)."""
    limits = effective_limits(config.limits, listener)
    starttls = tls and listener is not None and listener.tls == "starttls"
    return Settings(
        starttls=starttls,
        require_tls=starttls and listener.require_tls,
        hostname=hostname(config, listener),
        max_message_bytes=limits.max_message_size,
        max_recipients=limits.max_recipients,
        max_command_bytes=limits.max_command_length,
        max_errors=limits.max_errors,
        max_junk_commands=limits.max_junk_commands,
        bare_lf=limits.bare_lf,
        command_buffer_bytes=max(4096, 2 * limits.max_command_length),
        **({} if listener is None else authcheck.core_settings(listener.auth)),
    )


def hostname(config: Config, listener: Listener | None) -> str:
    """The name a listener's sessions greet with and write in Received:."""
    if listener is None or listener.hostname is None:
        return config.server.hostname
    return listener.hostname


class Profile:
    """What the sessions of one listener share in a worker, made once at its start (the
    merging of a listener's overrides with the top-level settings happens here, never
    per session) and bound to each session at accept: its core Settings, its deadlines,
    its fault rules (`decide`, with `handlers` by event type), and its counters."""

    __slots__ = ("name", "hostname", "settings", "implicit_tls", "proxy", "command_timeout",
                 "data_timeout", "min_data_rate", "rate_grace", "tls_handshake_timeout",
                 "proxy_timeout", "counts", "decide", "handlers")

    def __init__(self, config: Config, listener: Listener, counts: ListenerCounts, *,
                 tls: bool) -> None:
        limits = effective_limits(config.limits, listener)
        self.name = listener.name
        self.hostname = hostname(config, listener)
        self.settings = protocol_settings(config, listener, tls=tls)
        self.implicit_tls = tls and listener.tls == "implicit"
        self.proxy: ProxyProtocol | None = listener.proxy_protocol
        self.command_timeout = limits.command_timeout
        self.data_timeout = limits.data_timeout
        self.min_data_rate = limits.min_data_rate
        self.rate_grace = limits.min_data_rate_grace
        self.tls_handshake_timeout = limits.tls_handshake_timeout
        self.proxy_timeout = limits.proxy_timeout
        self.counts = counts  # this listener's place in the worker's stats
        self.decide: Decisions | None = None  # set by the worker: faults differ by listener
        self.handlers: dict[type, Any] = {}


class Session:
    """One client connection: transport, protocol state, message in progress, timers."""

    __slots__ = (
        "transport", "fd", "conn", "peer", "profile", "handshake", "preamble", "sink",
        "sink_error", "mask", "deadline", "timer_at", "data_started", "data_bytes",
        "data_bytes_at_tick", "body_read_at", "envelope", "size", "end_seen", "paused", "tarpits",
        "trickling", "lingering", "closed", "end", "client_entry",
    )

    def __init__(self, transport: PlainTransport, conn: SmtpServerConnection, peer: Peer,
                 profile: Profile | None = None) -> None:
        self.transport = transport
        self.profile = profile  # its listener's; None only in tests of parts of the loop
        self.fd = transport.fileno()  # the same for the connection's life, TLS or not
        self.handshake: Handshake | None = None  # while a TLS handshake runs
        self.preamble: ProxyRead | None = None  # while a PROXY header is read
        self.conn = conn
        self.peer = peer
        self.sink: Sink | None = None  # opened, written and closed by storage.py only
        self.sink_error: DeliveryError | None = None  # a write failed: the reply says why
        self.mask = 0  # what the loop's selector watches for: READ, WRITE or 0
        self.deadline = 0.0
        self.timer_at = float("inf")  # earliest live timer entry (see timers.py)
        self.data_started = 0.0
        self.data_bytes = 0
        self.data_bytes_at_tick = 0  # data_bytes at the worker's last tick (_trim_buffers)
        self.body_read_at = 0.0  # the loop turn of its last body read (turn.py)
        self.envelope: Envelope | None = None  # of the message in DATA
        self.size = 0  # of the message just ended
        self.end_seen = 0.0  # when its terminator arrived
        self.paused = False  # a decision is deferred (delay, commit): do not read
        # Replies a fault rule sends slowly, in order, while any is still to go out
        # (output.TarpitSpan); the output around them goes at full speed.
        self.tarpits: list[TarpitSpan] | None = None
        self.trickling = False
        self.lingering = False  # last reply sent, write side shut: draining until EOF
        self.closed = False
        self.end = ""  # how the session ended, when the worker decided it (the log's end=)
        self.client_entry = -1  # its client's entry in the per-client table while counted there
