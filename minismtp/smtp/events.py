"""Events the protocol core hands to the I/O layer, and the envelope they describe.

Events are facts about what the client did. The ones marked "decision" leave the core
PAUSED until the I/O layer answers with `accept()` or `reject(reply)`; the rest only inform.
"""

from __future__ import annotations

from dataclasses import dataclass

# Plain slotted dataclasses, not frozen ones: a frozen __init__ stores each field through
# object.__setattr__, three times the cost, and several events are made per message.
# Treat them as read-only all the same.


@dataclass(slots=True)
class Envelope:
    """Everything known about a transaction when its body starts."""

    helo: str
    esmtp: bool
    sender: str  # "" is the null reverse-path <>
    recipients: tuple[str, ...]
    smtputf8: bool = False
    body_8bitmime: bool = False
    declared_size: int | None = None
    tls: str | None = None  # the session's TLS, as `tls.describe()` gave it; None: plaintext
    # The user an accepted AUTH named (RFC 4954); None: not authenticated. For the log
    # and the Received protocol (ESMTPA, RFC 3848), never for a header.
    authenticated_as: str | None = None


@dataclass(slots=True)
class Hello:
    """Decision: HELO or EHLO with the client's claimed name."""

    name: str
    extended: bool


@dataclass(slots=True)
class MailFrom:
    """Decision: MAIL FROM, already checked for syntax and declared size."""

    sender: str
    size: int | None
    smtputf8: bool
    body_8bitmime: bool


@dataclass(slots=True)
class RcptTo:
    """Decision: RCPT TO, already checked for syntax and the recipient limit."""

    recipient: str


@dataclass(slots=True)
class DataStarted:
    """Decision: DATA; on accept the core sends 354 and starts scanning the body."""

    envelope: Envelope


@dataclass(slots=True)
class BodyChunk:
    """Unstuffed body bytes: a view borrowed from the receive buffer.

    Valid until more data is fed to the core (the next `free_view()`/`receive_data()`),
    so every chunk of one read may be gathered and written together.
    """

    data: memoryview


@dataclass(slots=True)
class MessageEnd:
    """Decision: the terminator arrived; accept(queue_id) only once the body is stored."""

    size: int


@dataclass(slots=True)
class MessageRejected:
    """The core refused a complete body itself (too big, bare LF) and already replied.

    Whatever was stored for it must be discarded.
    """

    size: int
    reason: str


@dataclass(slots=True)
class Reset:
    """RSET dropped the transaction in progress (already answered).

    An accepted HELO/EHLO drops a transaction too, without a Reset event of its own.
    """


@dataclass(slots=True)
class Quit:
    """Decision: QUIT; accept sends 221 and closes."""


@dataclass(slots=True)
class StartTls:
    """Decision: STARTTLS (RFC 3207), offered and in a state that allows it.

    accept() queues `220 2.0.0 Ready to start TLS`, drops every byte buffered after the
    command (see `SmtpServerConnection.discarded_after_starttls`) and waits, PAUSED, for
    the I/O layer to flush that reply, complete the handshake and call `tls_started()`.
    reject(reply) keeps the session in plaintext (454 4.7.0, or 421 to close).
    """


@dataclass(slots=True, repr=False)  # not frozen, as the others: that costs a call per field
class AuthAttempt:
    """Decision: credentials from an AUTH exchange (RFC 4954), decoded and well formed.

    Check them off the event loop (bcrypt costs milliseconds: see authcheck.py), then
    accept(), which sends `235 2.7.0` and sets `authenticated_as` to `username`, or
    reject(replies.AUTH_FAILED) (535 5.7.8; 454 4.7.0 for a temporary failure). Either
    way the exchange is over. A rejection counts against the error budget.

    `authzid` may name someone other than `username`: no proxy authorization is offered,
    so the worker refuses such an attempt as a failed login (`acts_as_other`). The
    password is never shown: not in repr, not in any reply.
    """

    mechanism: str  # "PLAIN" or "LOGIN"
    authzid: str
    username: str
    password: str  # bytes that were not UTF-8 are kept as surrogate escapes

    @property
    def acts_as_other(self) -> bool:
        """Whether the client asks to act as another user than the one it logs in as."""
        return self.authzid not in ("", self.username)

    def __repr__(self) -> str:
        return (f"AuthAttempt(mechanism={self.mechanism!r}, authzid={self.authzid!r}, "
                f"username={self.username!r}, password=<hidden>)")


@dataclass(slots=True)
class ConnectionClosed:
    """The core will say nothing more: flush what is queued, then close the socket."""

    reason: str


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")  # feed more bytes, then ask again
PAUSED = _Sentinel("PAUSED")  # answer the last decision event first

DECISIONS = (Hello, MailFrom, RcptTo, DataStarted, MessageEnd, Quit, StartTls, AuthAttempt)
