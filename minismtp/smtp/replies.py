"""Every SMTP reply minismtp sends, as values named by meaning.

A reply keeps its enhanced status code (RFC 3463) apart from its text, so nothing leaves
without one but the greeting and the HELO/EHLO answer (RFC 2034 section 3), the 354 to
DATA (an intermediate reply, as Postfix sends it too) and AUTH's 334 challenges (RFC 4954:
base64, nothing else).
Wire bytes are built once, when the reply is made.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

_TEXT_OK = re.compile(r"[\x20-\x7e]*")  # a reply is printable ASCII: no CR/LF injection
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str | None
    text: str | tuple[str, ...]
    wire: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code out of range: {self.code}")
        if self.enhanced is not None:
            if not _ENHANCED.fullmatch(self.enhanced) or self.enhanced[0] != str(self.code)[0]:
                raise ValueError(f"enhanced code {self.enhanced!r} does not fit {self.code}")
        lines = self.lines
        for line in lines:
            if not _TEXT_OK.fullmatch(line):
                raise ValueError(f"reply text must be printable ASCII: {line!r}")
        prefix = f"{self.enhanced} " if self.enhanced else ""
        last = len(lines) - 1
        wire = "".join(
            f"{self.code}{' ' if i == last else '-'}{prefix}{line}\r\n"
            for i, line in enumerate(lines)
        )
        object.__setattr__(self, "wire", wire.encode("ascii"))

    @property
    def lines(self) -> tuple[str, ...]:
        return (self.text,) if isinstance(self.text, str) else self.text

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @classmethod
    def parse(cls, line: str) -> Reply:
        """Build a reply from config text such as "450 4.2.0 Mailbox busy"."""
        m = re.fullmatch(r"([2-5]\d\d)(?: ([245]\.\d{1,3}\.\d{1,3}))?(?: (.*))?", line.strip())
        if not m:
            raise ValueError(f'not an SMTP reply: "{line}" (expected e.g. "450 4.2.0 Busy")')
        code = int(m.group(1))
        enhanced = m.group(2) or f"{code // 100}.0.0"
        return cls(code, enhanced, m.group(3) or "Error")


# Built once per distinct argument: these are asked for on every connection.
@functools.lru_cache(maxsize=8)
def greeting(hostname: str) -> Reply:
    return Reply(220, None, f"{hostname} ESMTP minismtp")


@functools.lru_cache(maxsize=8)
def ehlo(hostname: str, max_message_bytes: int, starttls: bool = False,
         auth: tuple[str, ...] = ()) -> Reply:
    """The EHLO reply; `starttls` lists STARTTLS (offered, and not in TLS yet), `auth`
    the SASL mechanisms AUTH offers now (none: no AUTH line)."""
    tls = ("STARTTLS",) if starttls else ()
    sasl = (f"AUTH {' '.join(auth)}",) if auth else ()
    return Reply(250, None, (
        hostname, "PIPELINING", f"SIZE {max_message_bytes}", *tls, *sasl, "8BITMIME",
        "ENHANCEDSTATUSCODES", "SMTPUTF8",
    ))


@functools.lru_cache(maxsize=8)
def helo(hostname: str) -> Reply:
    return Reply(250, None, hostname)


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


def queued_wire(queue_id: str) -> bytes:
    """The wire bytes of `queued(queue_id)`, without building a Reply per message."""
    if not (queue_id.isascii() and queue_id.isprintable()):
        raise ValueError(f"queue id must be printable ASCII: {queue_id!r}")
    return b"250 2.0.0 Ok: queued as %s\r\n" % queue_id.encode()


OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
START_INPUT = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
CLOSING = Reply(221, "2.0.0", "Bye")
# An HTTP request line: a browser made to post to us (cross-protocol, ALPACA). Closed at
# once, as Postfix's smtpd_forbidden_commands does, so no line after it runs as SMTP.
NOT_SMTP = Reply(221, "2.7.0", "Error: this is an SMTP server, not HTTP; closing connection")
HELP = Reply(214, "2.0.0", "Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP")
CANNOT_VRFY = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")

READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")  # RFC 3207 section 4

# Sequence and syntax (RFC 5321 section 4.2.4; enhanced codes RFC 3463).
UNRECOGNIZED = Reply(500, "5.5.2", "Error: command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: command line too long")
BARE_LF_COMMAND = Reply(500, "5.5.2", "Error: bare <LF> received; lines must end with <CR><LF>")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients")
BAD_SEQUENCE = Reply(503, "5.5.1", "Error: bad sequence of commands")
NO_SERVICE_SEQUENCE = Reply(503, "5.7.0", "Error: no service, only QUIT is accepted")
HELO_SYNTAX = Reply(501, "5.5.4", "Syntax: HELO hostname")
EHLO_SYNTAX = Reply(501, "5.5.4", "Syntax: EHLO hostname")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
NO_ARGUMENTS = Reply(501, "5.5.4", "Syntax: no arguments allowed")
VRFY_SYNTAX = Reply(501, "5.5.4", "Syntax: VRFY address")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
BAD_PARAMETER_VALUE = Reply(501, "5.5.4", "Bad parameter value")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
NEED_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address needs the SMTPUTF8 parameter")

STARTTLS_SYNTAX = Reply(501, "5.5.4", "Syntax: STARTTLS")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "Error: TLS already active")
MUST_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")  # RFC 3207 section 4
# STARTTLS offered, but refused this time (a fault rule, no usable context): RFC 3207 4.
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available due to temporary reason")

# AUTH (RFC 4954; enhanced codes section 6, 538 and 5.7.11 from RFC 5248's registry).
AUTH_CONTINUE = Reply(334, None, "")  # "334 ": send the PLAIN response (RFC 4954 4)
AUTH_USERNAME = Reply(334, None, "VXNlcm5hbWU6")  # LOGIN: base64 "Username:"
AUTH_PASSWORD = Reply(334, None, "UGFzc3dvcmQ6")  # LOGIN: base64 "Password:"
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_TEMPORARY_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_SYNTAX = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_NEED_EHLO = Reply(503, "5.5.1", "Error: send EHLO first")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Error: already authenticated")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode response")
AUTH_BAD_RESPONSE = Reply(501, "5.5.2", "Invalid authentication response")
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long")

# Limits.
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Error: message exceeds fixed maximum message size")
BARE_LF_DATA = Reply(550, "5.5.2", "Error: bare <LF> in message body; lines must end with <CR><LF>")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Error: too many errors, closing connection")

# Conditions the I/O layer reports.
LOCAL_ERROR = Reply(451, "4.3.0", "Error: local error in processing, try again later")
# The disk or a quota is full: RFC 5321 4.2.3 452 "insufficient system storage", RFC 3463
# 4.3.1 "mail system full". Still temporary: the client retries later.
STORAGE_FULL = Reply(452, "4.3.1", "Error: insufficient system storage, try again later")
TIMEOUT = Reply(421, "4.4.2", "Error: timeout exceeded, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.3.2", "Error: too many connections, try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")


# Per-client limits (limits.per_client), worded as Postfix's anvil refusals; `address` is
# the client's IP address as text (the peer, or a trusted PROXY header's source).
def too_many_sessions_from(hostname: str, address: str) -> Reply:
    return Reply(421, "4.7.0", f"{hostname} Error: too many connections from {address}")


def too_many_new_sessions_from(hostname: str, address: str) -> Reply:
    return Reply(421, "4.7.0",
                 f"{hostname} Error: too many connections per minute from {address}")


def too_many_recipients_from(address: str) -> Reply:
    return Reply(450, "4.7.1", f"Error: too many recipients from {address}")
