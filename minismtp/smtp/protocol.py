"""SmtpServerConnection: the sans-IO SMTP server state machine (RFC 5321).

Untrusted input: every byte the client sends. Commands are bounded by the line limit,
the body by the message-size limit, errors by a budget; nothing here can raise on input.

Theory of operation
-------------------
The I/O layer writes client bytes into `conn.buffer` (`free_view()` + `commit(n)`, or
`receive_data()`), then calls `next_event()` until it returns NEED_DATA or PAUSED:

- Protocol errors (unknown verb, bad syntax, wrong order, line too long, bare LF) are
  answered here; the replies wait in an internal buffer read by `data_to_send()`.
- A *decision* event (Hello, MailFrom, RcptTo, DataStarted, MessageEnd, Quit, StartTls)
  pauses the core until the I/O layer calls `accept()` or `reject(reply)`; only then are
  later pipelined commands looked at, so replies always leave in command order (RFC 2920).
- In DATA the body scanner hands out BodyChunk views of the buffer itself; the core
  counts them against the size limit and the bare-LF policy and answers 552/550 itself
  after the terminator (a "delayed reject": it never stops reading mid-DATA). A read
  that fills the buffer grows it to `data_buffer_bytes` (`_fit_buffer`); it goes back to
  the command size when the body ends, or when the I/O layer, which sees the time
  between reads, calls `trim_buffer()` for a body gone idle or slow.
- Bare LF (`Settings.bare_lf`, Postfix's smtpd_forbid_bare_newline): "normalize" takes
  an LF without its CR as a line end, in commands and in the body, where it is handed on
  as CRLF (a dot after it unstuffed: see scanner.py); "reject" answers 500 to such a
  command and 550 after such a body; "accept" passes the body on as it came. Under every
  policy only CRLF "." CRLF ends DATA.
- Errors are counted against `max_errors` (then 421 and close); a stored message
  forgives those before it, except wrong passwords. Junk commands, the ones a
  client can repeat forever at no cost (HELO, EHLO, NOOP, RSET, VRFY, HELP, and a MAIL
  refused for its SIZE), are answered as usual, but past `max_junk_commands` of them each
  one also counts as an error; see `_count_junk` for the exact rule. RCPTs past
  `max_recipients` get 452, and past `max_recipient_overshoot` of those in a session
  each one also counts as an error (Postfix's smtpd_recipient_overshoot_limit: a
  pipelining client may send many before it reads the first 452); RCPTs refused for the
  client's recipient rate (`reject(reply, overshoot=True)`) count with them. Other
  refusals by policy (fault rules, per-client limits on sessions) count as neither: a
  load test may refuse thousands.
  A 454 to AUTH and DATA's 554 after refused recipients are junk, not errors; a wrong
  password (535) is an error: guessing ends in 421.

States are an Enum; the commands allowed in each are the table `_NEXT_STATE`, and a
missing entry is the 503 (`_bad_sequence` picks its wording), decided in one place.

STARTTLS (RFC 3207), when `Settings.starttls` offers it: accepting the StartTls decision
queues 220, drops whatever the client sent after the command line (plaintext injected
before the handshake, CVE-2011-0411; counted in `discarded_after_starttls`) and leaves
the core PAUSED in STARTING_TLS. The I/O layer flushes the 220, completes the handshake
and calls `tls_started(description)`: the session starts afresh, without HELO or
transaction (RFC 3207 4.2). For implicit TLS (RFC 8314) it calls `tls_started()` before
`greet()`. Until TLS is up, `Settings.require_tls` answers MAIL, RCPT and DATA with 530.

AUTH (RFC 4954), PLAIN (RFC 4616) and LOGIN, when `Settings.auth_mechanisms` offers it:
EHLO lists it once TLS is up (or at once with `auth_plaintext`; before that AUTH gets
538). The exchange is state AUTH: each line the client sends is a base64 response, not a
command, bounded by `max_auth_line_bytes` (the buffer grows to hold one), "*" cancels.
Its end is the decision event AuthAttempt: accept() sends 235 and sets `authenticated_as`;
reject(reply) sends 535 (or 454) and counts an error. Every other way out of the exchange
(cancel, bad base64, a malformed response, a line too long) is answered here, counted as
an error, and returns to READY. With `auth_required` MAIL gets 530 until AUTH succeeded.
A STARTTLS forgets the authentication, as all else (RFC 3207 4.2). No reply and no event
text ever holds the password (AuthAttempt's repr hides it).
"""

from __future__ import annotations

import binascii
import enum
from dataclasses import dataclass
from typing import Callable

from minismtp.smtp import replies
from minismtp.smtp.arguments import (
    ArgumentError, parse_mail_parameters, recipient_path, sender_path,
)
from minismtp.smtp.buffer import ReceiveBuffer
from minismtp.smtp.events import (
    NEED_DATA, PAUSED, AuthAttempt, BodyChunk, ConnectionClosed, DataStarted, Envelope, Hello,
    MailFrom, MessageEnd, MessageRejected, Quit, RcptTo, Reset, StartTls,
)
from minismtp.smtp.replies import Reply
from minismtp.smtp.scanner import (
    CR, DOT, LF, NEED_MORE, HOP_PIECE_BYTES, BodyScanner, LineScanner, find_bare_lf, has_bare_lf,
    normalize_bare_lf, normalized_size,
)


# What MAIL's parameters may add to its line beyond max_command_bytes: SIZE= (RFC 1870:
# 26 octets), AUTH= (RFC 4954 3: 500) and SMTPUTF8 (RFC 6531 3.4: 10). Other commands
# keep the limit.
MAIL_EXTRA_BYTES = 536


@dataclass(frozen=True, slots=True)
class Settings:
    hostname: str = "localhost"
    max_message_bytes: int = 32 * 1024 * 1024
    max_recipients: int = 1000  # RFC 5321 4.5.3.1.8: at least 100
    max_command_bytes: int = 512  # RFC 5321 4.5.3.1.4, CRLF included
    max_errors: int = 20  # protocol errors before 421 (Postfix smtpd_hard_error_limit)
    max_junk_commands: int = 100  # then each one is an error (smtpd_junk_command_limit)
    max_recipient_overshoot: int = 1000  # RCPTs past max_recipients, then errors (Postfix)
    bare_lf: str = "normalize"  # or "reject", "accept" (module docstring)
    command_buffer_bytes: int = 4096  # kept by every connection, idle ones too
    data_buffer_bytes: int = 256 * 1024  # taken while a body streams in (_fit_buffer)
    # STARTTLS offered (EHLO lists it). Not offered, the command gets 502 like any other
    # extension we lack; offered but refused by a decision (fault rule, no usable
    # context), 454 4.7.0 (`replies.TLS_NOT_AVAILABLE`).
    starttls: bool = False
    require_tls: bool = False  # MAIL, RCPT, DATA get 530 5.7.0 until TLS is up
    # AUTH (RFC 4954): the SASL mechanisms offered, from AUTH_MECHANISMS; none: AUTH is
    # not offered (502). Without TLS it is offered only with auth_plaintext (else 538).
    auth_mechanisms: tuple[str, ...] = ()
    auth_plaintext: bool = False
    auth_required: bool = False  # MAIL gets 530 5.7.0 until AUTH succeeded
    # An AUTH response line, CRLF included (or max_command_bytes, if that is larger).
    # RFC 4954 4 lets it exceed the command limit (12288 octets); PLAIN credentials fit
    # in far less, and the buffer grows to hold one only for the exchange.
    max_auth_line_bytes: int = 12288

    def __post_init__(self) -> None:
        # A whole command line must fit, or the line scanner could never find its end.
        if self.command_buffer_bytes <= self.max_command_bytes + MAIL_EXTRA_BYTES:
            raise ValueError("command_buffer_bytes must exceed max_command_bytes + "
                             f"{MAIL_EXTRA_BYTES} (MAIL_EXTRA_BYTES)")
        if self.bare_lf not in BARE_LF_POLICIES:
            raise ValueError(f"bare_lf must be one of {BARE_LF_POLICIES}")
        if not set(self.auth_mechanisms) <= set(AUTH_MECHANISMS):
            raise ValueError(f"auth_mechanisms must be among {AUTH_MECHANISMS}")
        if self.auth_required and not self.auth_mechanisms:
            raise ValueError("auth_required needs auth_mechanisms")


_NO_PARAMETERS = (None, None, False)  # parse_mail_parameters(()): no SIZE, BODY, SMTPUTF8
BARE_LF_POLICIES = ("normalize", "reject", "accept")
AUTH_MECHANISMS = ("PLAIN", "LOGIN")


class State(enum.Enum):
    START = "start"  # the greeting is not decided yet
    WAIT_HELO = "wait-helo"
    READY = "ready"  # greeted, no transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"
    NO_SERVICE = "no-service"  # negative greeting: only QUIT (RFC 5321 3.1)
    STARTING_TLS = "starting-tls"  # 220 to STARTTLS sent; waiting for tls_started()
    AUTH = "auth"  # inside an AUTH exchange: lines are responses, not commands
    CLOSED = "closed"

    # Members are singletons, so identity hashing is exact; Enum's own __hash__ is
    # Python code, and the transition table is looked up once per command.
    __hash__ = object.__hash__


# The members as module globals: reading one from the Enum class goes through its
# metaclass, ten times slower than a global, and states are compared several times per
# command.
_START, _WAIT_HELO, _READY, _MAIL = State.START, State.WAIT_HELO, State.READY, State.MAIL
_RCPT, _DATA, _NO_SERVICE = State.RCPT, State.DATA, State.NO_SERVICE
_STARTING_TLS, _AUTH, _CLOSED = State.STARTING_TLS, State.AUTH, State.CLOSED
_HELLO_STATES = (_WAIT_HELO, _READY, _MAIL, _RCPT)
_NEXT_STATE: dict[tuple[State, str], State] = {
    **{(s, "HELO"): _READY for s in _HELLO_STATES},
    **{(s, "EHLO"): _READY for s in _HELLO_STATES},
    (_READY, "MAIL"): _MAIL,
    (_MAIL, "RCPT"): _RCPT,
    (_RCPT, "RCPT"): _RCPT,
    (_RCPT, "DATA"): _DATA,
    # Not inside a transaction (RFC 3207 4); a HELO first is not required.
    (_WAIT_HELO, "STARTTLS"): _STARTING_TLS,
    (_READY, "STARTTLS"): _STARTING_TLS,
    (_READY, "AUTH"): _AUTH,  # not inside a transaction (RFC 4954 4)
}
_ANY_STATE = frozenset({"RSET", "NOOP", "QUIT", "VRFY", "HELP"})
# Commands that move no mail and can be repeated at will (Postfix flags HELO, EHLO, RSET,
# NOOP, VRFY and ETRN with SMTPD_CMD_FLAG_LIMIT; ETRN is not implemented here, HELP is).
_JUNK = frozenset({"HELO", "EHLO", "NOOP", "RSET", "VRFY", "HELP"})
_NEEDS_TLS = frozenset({"MAIL", "RCPT", "DATA"})  # with require_tls, 530 until TLS is up
_NOT_IMPLEMENTED = frozenset({
    "EXPN", "TURN", "ETRN", "ATRN", "AUTH", "STARTTLS", "BDAT", "SEND", "SOML", "SAML",
})


# What a client that does not speak SMTP sends first, for the log: a TLS ClientHello (a
# client expecting implicit TLS), an HTTP request, a PROXY protocol (v1) header.
_HTTP_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "OPTIONS", "CONNECT", "DELETE"})


def _foreign_protocol(line: str) -> str:
    if line[:1] == "\x16":
        return "TLS handshake"
    verb = line.split(" ", 1)[0].upper()
    if verb in _HTTP_VERBS:
        return "HTTP request"
    if verb == "PROXY":  # version 1; version 2's binary signature begins with an empty line
        return "PROXY protocol header"
    return ""


def _bad_sequence(state: State, verb: str, rcpt_attempted: bool) -> Reply:
    if state is _NO_SERVICE:
        return replies.NO_SERVICE_SEQUENCE
    if state is _WAIT_HELO and verb in ("MAIL", "AUTH"):
        return replies.NEED_HELO
    if verb == "AUTH":
        return replies.BAD_SEQUENCE
    if verb == "MAIL":
        return replies.NESTED_MAIL
    if verb == "RCPT" or state in (_WAIT_HELO, _READY):
        return replies.NEED_MAIL
    if verb == "DATA":
        return replies.NO_VALID_RECIPIENTS if rcpt_attempted else replies.NEED_RCPT
    return replies.BAD_SEQUENCE


class SmtpServerConnection:
    """One SMTP session, from greeting to close. See the module docstring."""

    # Slots, not a __dict__: a connection is made per client and its attributes are read
    # on every command; past 30 attributes CPython also stops sharing dict keys between
    # instances, which made each connection measurably dearer (bench/worker_python.py).
    __slots__ = (
        "authenticated_as", "buffer", "commands", "discarded_after_starttls",
        "foreign_protocol", "refusals", "settings", "state", "tls", "_after_bare_lf",
        "_auth_failures", "_auth_lines", "_auth_step", "_auth_user", "_bare_lf_seen", "_body", "_body_8bit",
        "_body_bytes", "_close_reason", "_declared_size", "_errors", "_esmtp", "_forgiven",
        "_handlers", "_helo", "_junk_commands", "_lines", "_normalize_bare_lf", "_out",
        "_overshoot", "_pending", "_rcpt_attempts", "_recipients", "_reject_bare_lf",
        "_sender", "_smtputf8", "_tls_needed",
    )

    def __init__(self, settings: Settings = Settings()) -> None:
        self.settings = settings
        self.buffer = ReceiveBuffer(settings.command_buffer_bytes)
        self.state = _START
        self._lines = LineScanner(settings.max_command_bytes, b"MAIL ", MAIL_EXTRA_BYTES)
        self._out: list[bytes] = []
        self._pending: object | None = None  # the decision event awaiting an answer
        self._close_reason = ""
        self._errors = 0  # in the session, for its log line
        self._forgiven = 0  # of those, forgiven by a stored message (as Postfix does)
        self._auth_failures = 0  # wrong passwords: never forgiven
        self._junk_commands = 0
        self._overshoot = 0  # RCPTs refused past max_recipients, this session
        # Negative replies the core sent, by code; the I/O layer counts them and clears
        # this from time to time, so it holds those not counted yet.
        self.refusals: dict[int, int] = {}
        # Commands received, by verb (unknown verbs as one "unknown": the keys stay few),
        # for the session's summary line; and what a first unknown line looked like.
        self.commands: dict[str, int] = {}
        self.foreign_protocol = ""
        self._helo = ""
        self._esmtp = False
        self._handlers = _HANDLER_SETS[settings.starttls, bool(settings.auth_mechanisms)]
        self._reject_bare_lf = settings.bare_lf == "reject"
        self._normalize_bare_lf = settings.bare_lf == "normalize"
        self.tls: str | None = None  # once TLS is up: its description (tls.describe())
        self._tls_needed = settings.require_tls  # and not in TLS yet
        self.discarded_after_starttls = 0  # bytes dropped at the switch (CVE-2011-0411)
        self.authenticated_as: str | None = None  # set by accepting an AuthAttempt
        self._auth_step = ""  # in state AUTH: "plain", "login-user" or "login-password"
        self._auth_user = ""  # LOGIN: the username, while the password is awaited
        self._auth_lines: LineScanner | None = None  # made at the first exchange
        self._reset_transaction()

    # -- I/O layer API -------------------------------------------------------------

    def greet(self, reply: Reply | None = None) -> None:
        """Send the greeting. 421 closes; any other non-2xx leaves only QUIT usable."""
        if self.state is not _START:
            raise RuntimeError("greet() is called once, first")
        reply = reply or replies.greeting(self.settings.hostname)
        self._out.append(reply.wire)
        if reply.code == 421:
            self._close("greeting refused")
        else:
            self.state = _WAIT_HELO if reply.is_positive else _NO_SERVICE

    def receive_data(self, data: bytes) -> int:
        """Copy bytes in (tests, small inputs); return how many fitted. 0 means: drain
        events first (or the core is closed)."""
        if self.state is _CLOSED:
            return 0
        return self.buffer.feed(data)

    def next_event(self) -> object:
        """The next event, NEED_DATA (feed more bytes) or PAUSED (answer first)."""
        if self._pending is not None or self.state is _START or self.state is _STARTING_TLS:
            return PAUSED
        if self.state is _DATA:
            return self._next_body_event()
        if self.state is _AUTH:
            event = self._next_auth_event()
            if event is not None:
                return event  # else the exchange is over: back to commands
        # Commands are read here rather than in a method of their own: this runs two or
        # three times per command, and a call is a good part of its cost.
        buf = self.buffer
        data = buf.data
        if buf.start == buf.end and len(data) <= self.settings.command_buffer_bytes:
            # Nothing buffered, nothing to shrink: the usual case after an answer.
            return NEED_DATA if self.state is not _CLOSED else ConnectionClosed(
                self._close_reason)
        next_line = self._lines.next_line
        while self.state is not _CLOSED:
            lf, begin = next_line(data, buf.start, buf.end)
            if lf < 0:
                buf.start = begin
                if lf == NEED_MORE:
                    self._maybe_shrink()
                    return NEED_DATA
                self._error(replies.LINE_TOO_LONG)
                continue
            buf.start = lf + 1
            if lf > begin and data[lf - 1] == CR:
                lf -= 1
            elif self._reject_bare_lf:
                self._error(replies.BARE_LF_COMMAND)
                continue
            event = self._dispatch(str(data[begin:lf], "utf-8", "surrogateescape"))
            if event is not None:
                if type(event) in _INFORMATIONAL:
                    return event
                self._pending = event
                return event
            if self.state is _AUTH:  # AUTH began an exchange: read its responses
                event = self._next_auth_event()
                if event is not None:
                    return event
                data = buf.data  # the exchange may have grown the buffer
        return ConnectionClosed(self._close_reason)

    def accept(self, queue_id: str | None = None) -> None:
        """Answer the pending decision positively (MessageEnd needs the queue id)."""
        event = self._pending  # _take_pending(), inline: this runs for every command
        if event is None:
            raise RuntimeError("no decision is pending")
        kind = type(event)
        if kind is MessageEnd and not queue_id:
            raise ValueError("accepting a message needs its queue id")
        self._pending = None
        if kind is Hello:
            self._reset_transaction()
            self._helo, self._esmtp = event.name, event.extended
            s = self.settings
            offer_tls = s.starttls and self.tls is None
            self._out.append(
                replies.ehlo(s.hostname, s.max_message_bytes, offer_tls,
                             self._auth_offered).wire if event.extended
                else replies.helo(s.hostname).wire)
            self.state = _READY
            self._count_junk()  # after the reply: a decision, counted once it is answered
        elif kind is MailFrom:
            self._sender = event.sender
            self._smtputf8, self._body_8bit = event.smtputf8, event.body_8bitmime
            self._declared_size = event.size
            self._out.append(replies.SENDER_OK.wire)
            self.state = _MAIL
        elif kind is RcptTo:
            self._recipients.append(event.recipient)
            self._out.append(replies.RECIPIENT_OK.wire)
            self.state = _RCPT
        elif kind is DataStarted:
            self._out.append(replies.START_INPUT.wire)
            self._start_body()
        elif kind is MessageEnd:
            self._out.append(replies.queued_wire(queue_id))
            self._end_transaction()
            # A stored message earns a fresh allowance of junk and errors (Postfix too), but
            # not of wrong passwords: sending mail between guesses must not buy more guesses.
            self._junk_commands = 0
            self._forgiven = self._errors - self._auth_failures
        elif kind is StartTls:
            self._out.append(replies.READY_FOR_TLS.wire)
            self._drop_buffered()
            self.state = _STARTING_TLS
        elif kind is AuthAttempt:
            self._out.append(replies.AUTH_OK.wire)
            self.authenticated_as = event.username
            self.state = _READY
        else:  # Quit
            self._out.append(replies.CLOSING.wire)
            self._close("quit")

    def reject(self, reply: Reply, *, overshoot: bool = False) -> None:
        """Answer the pending decision with `reply`; the state stays where it was
        (a 421 closes the session). `overshoot`: a RCPT refused for how many recipients
        the client sends (its rate), counted as RCPTs past max_recipients are."""
        event = self._take_pending()
        self._out.append(reply.wire)
        if overshoot and type(event) is RcptTo:
            self._count_overshoot()
        if isinstance(event, MessageEnd):
            self._end_transaction()
        if isinstance(event, AuthAttempt):
            self.state = _READY
            if reply.code == 535:
                self._auth_failures += 1
                self._count_error()  # wrong credentials: guessing passwords ends in 421
            elif reply.code != 421:
                # A 454 (a full check queue, a fault rule) is the server's trouble, not
                # the client's error; a junk command, so that retrying it without end
                # cannot keep a session open.
                self._count_junk()
        if isinstance(event, Quit):
            self._close("quit")
        elif reply.code == 421:  # RFC 5321 3.8: 421 means the channel is being closed
            self._close("closed by server: 421")
        elif isinstance(event, Hello):
            self._count_junk()

    def tls_started(self, description: str = "") -> None:
        """TLS is up: after an accepted STARTTLS once the handshake completed, or for
        implicit TLS before `greet()`. `description` (`tls.describe()`) goes into the
        envelope, hence the Received header. After STARTTLS the session starts afresh:
        no HELO, no transaction (RFC 3207 4.2)."""
        if self.state is _STARTING_TLS:
            self._drop_buffered()  # nothing sent in plaintext may count as said in TLS
            self._reset_transaction()
            self._helo, self._esmtp = "", False
            self.authenticated_as = None  # RFC 3207 4.2: forget all said in plaintext
            self.state = _WAIT_HELO
        elif self.state is not _START or self.tls is not None:
            raise RuntimeError("tls_started() follows an accepted STARTTLS, or comes first")
        self.tls = description
        self._tls_needed = False

    def shutdown(self, reply: Reply) -> None:
        """Send a last reply (timeout, shutting down) and close, whatever was pending."""
        if self.state is not _CLOSED:
            self._pending = None
            self._out.append(reply.wire)
            self._close(f"closed by server: {reply.code}")

    def disconnect(self, reason: str = "dropped by server") -> None:
        """Close without answering the pending command (fault injection). Replies to
        commands before it still go out: a pipelined 250 for a stored message must not
        be lost with the connection, or the client sends the message again."""
        self._pending = None
        self._close(reason)

    def trim_buffer(self) -> None:
        """Give the large buffer back while a body has slowed or stopped coming (the I/O
        layer decides when: it sees the time between reads). Only in DATA, and only with
        room left for a read; a read that fills the small buffer grows it again."""
        if self.state is _DATA:
            self._maybe_shrink()

    @property
    def queued_bytes(self) -> int:
        """Octets of the replies queued, not yet taken by data_to_send."""
        return sum(map(len, self._out))

    def data_to_send(self) -> bytes:
        """Replies queued so far, in order, as one batch."""
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    @property
    def in_transaction(self) -> bool:
        return self.state in (_MAIL, _RCPT, _DATA) or isinstance(
            self._pending, (DataStarted, MessageEnd))

    @property
    def closed(self) -> bool:
        return self.state is _CLOSED

    @property
    def sender(self) -> str:
        """The accepted sender of the transaction in progress; "" outside one (and for
        the null sender <>)."""
        return self._sender

    @property
    def errors(self) -> int:
        """Protocol errors in the session so far, forgiven ones included (the budget,
        Settings.max_errors, counts those since the last stored message, and every wrong
        password)."""
        return self._errors

    @property
    def close_reason(self) -> str:
        return self._close_reason

    @property
    def _auth_offered(self) -> tuple[str, ...]:
        """The mechanisms EHLO lists now: none before TLS unless auth_plaintext."""
        s = self.settings
        return s.auth_mechanisms if self.tls is not None or s.auth_plaintext else ()

    @property
    def awaiting_tls(self) -> bool:
        """STARTTLS was accepted: flush the 220, then hand the socket to TLS."""
        return self.state is _STARTING_TLS

    # -- commands ------------------------------------------------------------------

    def _dispatch(self, text: str) -> object | None:
        verb, _, arg = text.partition(" ")
        # ASCII letters only: str.upper() would also make "MAıL" (dotless i) MAIL, a
        # command that a filter in front of us reads as unknown (RFC 5321 2.4).
        verb = verb.upper() if verb.isascii() else ""
        handler = self._handlers.get(verb)
        commands = self.commands
        if handler is None:
            if verb in _HTTP_VERBS:  # no command of SMTP's: what follows is no SMTP either
                commands["unknown"] = commands.get("unknown", 0) + 1
                self.foreign_protocol = "HTTP request"
                self._refuse(replies.NOT_SMTP)
                self._close("refused: not SMTP")
                return None
            if not commands:
                self.foreign_protocol = _foreign_protocol(text)
            commands["unknown"] = commands.get("unknown", 0) + 1
            self._error(replies.NO_SERVICE_SEQUENCE if self.state is _NO_SERVICE
                        else replies.NOT_IMPLEMENTED if verb in _NOT_IMPLEMENTED
                        else replies.UNRECOGNIZED)
            return None
        commands[verb] = commands.get(verb, 0) + 1
        if self.state is _NO_SERVICE and verb != "QUIT":
            self._error(replies.NO_SERVICE_SEQUENCE)  # RFC 5321 3.1: 503 to all but QUIT
            return None
        if self._tls_needed and verb in _NEEDS_TLS:
            self._error(replies.MUST_STARTTLS)
            return None
        if verb not in _ANY_STATE and (self.state, verb) not in _NEXT_STATE:
            reply = _bad_sequence(self.state, verb, self._rcpt_attempts > 0)
            if reply is replies.NO_VALID_RECIPIENTS:
                # Not the client's error: a pipelining client sends DATA before it can
                # know that every RCPT was refused (RFC 2920 3.1). A junk command, so
                # that repeating it cannot keep a session open.
                self._refuse(reply)
                self._count_junk()
            else:
                self._error(reply)
            return None
        try:
            event = handler(self, arg.strip(" "))
        except ArgumentError as problem:
            self._error(problem.reply)
            event = None
        if verb in _JUNK and type(event) is not Hello:  # Hello: counted when answered
            self._count_junk()
        return event

    def _helo_cmd(self, arg: str) -> object:
        if not arg or not arg.isprintable():
            raise ArgumentError(replies.HELO_SYNTAX)
        return Hello(arg, extended=False)

    def _ehlo_cmd(self, arg: str) -> object:
        if not arg or not arg.isprintable():
            raise ArgumentError(replies.EHLO_SYNTAX)
        return Hello(arg, extended=True)

    def _mail_cmd(self, arg: str) -> object | None:
        if self.settings.auth_required and self.authenticated_as is None:
            raise ArgumentError(replies.AUTH_REQUIRED)
        sender, params = sender_path(arg)
        size, body, smtputf8 = parse_mail_parameters(
            params, auth=bool(self.settings.auth_mechanisms)) if params else _NO_PARAMETERS
        if not self._esmtp and params:
            raise ArgumentError(replies.UNKNOWN_PARAMETER)  # RFC 5321 4.1.1.11: HELO means no extensions
        if not smtputf8 and not sender.isascii():
            raise ArgumentError(replies.NEED_SMTPUTF8)
        if size is not None and size > self.settings.max_message_bytes:
            self._refuse(replies.MESSAGE_TOO_BIG)  # a limit, not a client error,
            self._count_junk()  # but one it could repeat forever
            return None
        return MailFrom(sender, size, smtputf8, body == "8BITMIME")

    def _rcpt_cmd(self, arg: str) -> object | None:
        recipient, params = recipient_path(arg)
        if params:
            raise ArgumentError(replies.UNKNOWN_PARAMETER)
        if not self._smtputf8 and not recipient.isascii():
            raise ArgumentError(replies.NEED_SMTPUTF8)
        self._rcpt_attempts += 1
        if len(self._recipients) >= self.settings.max_recipients:
            self._refuse(replies.TOO_MANY_RECIPIENTS)
            self._count_overshoot()
            return None
        return RcptTo(recipient)

    def _data_cmd(self, arg: str) -> object:
        if arg:
            raise ArgumentError(replies.NO_ARGUMENTS)
        return DataStarted(Envelope(
            self._helo, self._esmtp, self._sender, tuple(self._recipients),
            self._smtputf8, self._body_8bit, self._declared_size, self.tls,
            self.authenticated_as))

    def _rset_cmd(self, arg: str) -> object | None:
        if arg:
            raise ArgumentError(replies.NO_ARGUMENTS)
        self._out.append(replies.OK.wire)
        if self.state in (_MAIL, _RCPT):
            self._reset_transaction()
            self.state = _READY
            return Reset()
        return None

    def _noop_cmd(self, arg: str) -> None:
        self._out.append(replies.OK.wire)

    def _quit_cmd(self, arg: str) -> object:
        return Quit()

    def _starttls_cmd(self, arg: str) -> object:
        if self.tls is not None:
            raise ArgumentError(replies.TLS_ALREADY_ACTIVE)
        if arg:
            raise ArgumentError(replies.STARTTLS_SYNTAX)
        return StartTls()

    def _auth_cmd(self, arg: str) -> object | None:
        """AUTH mechanism [initial-response]: start the exchange (state AUTH), or end it
        at once when the initial response completes the credentials."""
        if self.authenticated_as is not None:
            raise ArgumentError(replies.ALREADY_AUTHENTICATED)  # RFC 4954 4
        if not self._esmtp:
            raise ArgumentError(replies.AUTH_NEED_EHLO)
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper() if mechanism.isascii() else "?"  # as verbs are
        if not mechanism or " " in initial:
            raise ArgumentError(replies.AUTH_SYNTAX)
        if mechanism not in self.settings.auth_mechanisms:
            raise ArgumentError(replies.AUTH_UNKNOWN_MECHANISM)
        if not self._auth_offered:
            raise ArgumentError(replies.AUTH_NEEDS_TLS)
        self.state = _AUTH
        self._auth_step = "plain" if mechanism == "PLAIN" else "login-user"
        if initial:
            event = self._auth_response(initial)
        else:
            event = None
            self._out.append(replies.AUTH_CONTINUE.wire if mechanism == "PLAIN"
                             else replies.AUTH_USERNAME.wire)
        if self.state is _AUTH and event is None:
            # Responses follow. Only now may the buffer change: `next_event` then reads
            # it afresh, as it does on every way into the exchange.
            self._grow_for_auth()
        return event

    def _next_auth_event(self) -> object | None:
        """Read response lines of the AUTH exchange: the AuthAttempt, NEED_DATA, or None
        once the exchange ended without one (refused here; commands follow)."""
        buf = self.buffer
        lines = self._auth_lines
        assert lines is not None
        while self.state is _AUTH:
            lf, begin = lines.next_line(buf.data, buf.start, buf.end)
            if lf < 0:
                buf.start = begin
                if lf == NEED_MORE:
                    return NEED_DATA
                self._lines.discarding = lines.discarding  # the rest of it is no command
                self._end_auth(replies.AUTH_LINE_TOO_LONG)
                break
            buf.start = lf + 1
            if lf > begin and buf.data[lf - 1] == CR:
                lf -= 1
            elif self._reject_bare_lf:
                self._end_auth(replies.BARE_LF_COMMAND)
                break
            event = self._auth_response(buf.data[begin:lf].decode("latin-1"))
            if event is not None:
                self._pending = event
                return event
        return None

    def _auth_response(self, text: str) -> AuthAttempt | None:
        """Take one response (or initial response): the event once the credentials are
        complete, else None with the next 334 or a refusal queued."""
        if text == "*":
            self._end_auth(replies.AUTH_CANCELLED)  # RFC 4954 4: 501
            return None
        if text == "=":  # an initial response of zero length
            decoded = b""
        else:
            try:
                decoded = binascii.a2b_base64(text.encode("latin-1"), strict_mode=True)
            except (binascii.Error, ValueError):
                self._end_auth(replies.AUTH_BAD_BASE64)
                return None
            if not decoded and text:
                self._end_auth(replies.AUTH_BAD_BASE64)
                return None
        value = decoded.decode("utf-8", "surrogateescape")
        step = self._auth_step
        if step == "login-user":
            self._auth_user, self._auth_step = value, "login-password"
            self._out.append(replies.AUTH_PASSWORD.wire)
            return None
        if step == "login-password":
            user, self._auth_user = self._auth_user, ""
            if not user or not value:
                self._end_auth(replies.AUTH_BAD_RESPONSE)
                return None
            return AuthAttempt("LOGIN", "", user, value)
        # RFC 4616 2: [authzid] NUL authcid NUL passwd, authcid and passwd not empty.
        parts = value.split("\0")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            self._end_auth(replies.AUTH_BAD_RESPONSE)
            return None
        # An authzid naming someone else is handed on too: the worker refuses it as a
        # failed login (delayed, counted and logged like a wrong password).
        return AuthAttempt("PLAIN", *parts)

    def _end_auth(self, reply: Reply) -> None:
        """The exchange ends without an attempt to decide: refused, an error counted."""
        self._auth_user = ""
        self.state = _READY
        self._error(reply)

    def _grow_for_auth(self) -> None:
        s = self.settings
        limit = max(s.max_auth_line_bytes, s.max_command_bytes)
        if self._auth_lines is None:
            self._auth_lines = LineScanner(limit)
        self._auth_lines.reset()
        buf, need = self.buffer, limit + 1
        if buf.capacity < need:
            buf.resize(need)  # given back by _maybe_shrink once commands resume

    def _vrfy_cmd(self, arg: str) -> None:
        if not arg:
            raise ArgumentError(replies.VRFY_SYNTAX)
        self._out.append(replies.CANNOT_VRFY.wire)

    def _help_cmd(self, arg: str) -> None:
        self._out.append(replies.HELP.wire)

    # -- body ----------------------------------------------------------------------

    def _start_body(self) -> None:
        self.state = _DATA
        self._body = BodyScanner()
        self._body_bytes = 0
        self._bare_lf_seen = False
        self._after_bare_lf = False  # normalize: the last piece ended in a bare LF
        self._lines.reset()

    def _next_body_event(self) -> object:
        buf = self.buffer
        data = buf.data
        body = self._body
        limit = self.settings.max_message_bytes
        check_bare_lf = self._reject_bare_lf
        normalize = self._normalize_bare_lf
        while True:
            if body.done:  # only after the last piece of body went out
                return self._end_body()
            pos = buf.start
            buf.start = body.step(data, pos, buf.end)
            copied = body.copied
            size = len(copied) if copied is not None else body.stop - body.start
            if size:
                if copied is None:
                    piece, start, stop = data, body.start, body.stop
                    chunk = buf.view(start, stop)
                else:
                    piece, start, stop = copied, 0, size
                    chunk = memoryview(copied)
                if normalize:  # sizes count the body as handed on, CRLF only
                    if self._body_bytes > limit:  # refused: only the count matters now
                        self._body_bytes += self._normalized_size(piece, start, stop)
                        continue
                    chunk = self._normalized(chunk, piece, start, stop)
                    self._body_bytes += len(chunk)
                    if chunk and self._body_bytes <= limit:
                        return BodyChunk(chunk)
                    continue
                self._body_bytes += size
                if self._bare_lf_seen:
                    continue  # refused whatever follows: read on, store nothing more
                # Bare LF is looked for even past the size limit, so which refusal a body
                # gets never depends on how its bytes were split into reads.
                if check_bare_lf and has_bare_lf(piece, start, stop):
                    self._bare_lf_seen = True
                elif self._body_bytes <= limit:
                    return BodyChunk(chunk)
            elif buf.start == pos and not body.done:
                if buf.end == len(data):  # the last read filled the buffer
                    self._fit_buffer()
                return NEED_DATA

    def _normalized(self, chunk: memoryview, data: bytes | bytearray, start: int,
                    stop: int) -> memoryview:
        """A body piece (`chunk`, which is `data[start:stop]`) under "normalize": as it is
        when it holds no bare LF and does not open a line after one (the usual case, no
        copy), else `normalize_bare_lf`."""
        after = self._after_bare_lf
        self._after_bare_lf = data[stop - 1] == LF and (
            stop - start == 1 or data[stop - 2] != CR)
        if stop - start < HOP_PIECE_BYTES:  # the usual piece: one C call on its own view
            bare = find_bare_lf(chunk) is not None
        else:
            bare = has_bare_lf(data, start, stop)
        if not bare and not (after and data[start] == DOT):
            return chunk
        return memoryview(normalize_bare_lf(chunk, after))

    def _normalized_size(self, data: bytes | bytearray, start: int, stop: int) -> int:
        """The size `_normalized` would hand on, counted without a copy: past the size
        limit nothing is stored, and a body of bare LFs costs a few counting passes."""
        after = self._after_bare_lf
        self._after_bare_lf = data[stop - 1] == LF and (
            stop - start == 1 or data[stop - 2] != CR)
        return normalized_size(data, start, stop, after)

    def _end_body(self) -> object:
        if len(self.buffer.data) > self.settings.command_buffer_bytes:
            self._maybe_shrink()  # now: a client may idle until its next command
        size = self._body_bytes
        if self._bare_lf_seen:
            refusal, reason = replies.BARE_LF_DATA, "bare LF in body"
        elif size > self.settings.max_message_bytes:
            refusal, reason = replies.MESSAGE_TOO_BIG, "message too big"
        else:
            self._pending = MessageEnd(size)
            self.state = _READY  # the body is over; the decision decides the reply
            return self._pending
        self._refuse(refusal)
        self._end_transaction()
        return MessageRejected(size, reason)

    def _fit_buffer(self) -> None:
        """Grow the buffer for the body's next read: the last one filled it.

        Here the scanner has taken all but a few bytes, so a buffer that ends full was
        filled by the last read: the body came faster than it was read, and more likely
        waits. Read it in big gulps, and keep the large buffer across reads that leave
        room: giving it back after each (a body arriving in 4-32 KiB bursts, as from most
        internet clients) cost every burst two reads and two resizes, 20-60% more CPU
        per MiB. The core cannot see the time between reads, so it never gives the
        buffer back on a read's size; the I/O layer calls `trim_buffer` for a body that
        has slowed or stopped, and the buffer goes back when the body ends.
        """
        buf, size = self.buffer, self.settings.data_buffer_bytes
        if len(buf.data) < size:
            buf.resize(size)

    def _maybe_shrink(self) -> None:
        buf, cap = self.buffer, self.settings.command_buffer_bytes
        if buf.capacity > cap and len(buf) <= cap // 2:
            buf.resize(cap)  # the body is over or idle: give the large buffer back

    # -- bookkeeping ---------------------------------------------------------------

    def _take_pending(self) -> object:
        event, self._pending = self._pending, None
        if event is None:
            raise RuntimeError("no decision is pending")
        return event

    def _reset_transaction(self) -> None:
        self._sender = ""
        self._recipients: list[str] = []
        self._rcpt_attempts = 0
        self._smtputf8 = False
        self._body_8bit = False
        self._declared_size: int | None = None

    def _drop_buffered(self) -> None:
        buf = self.buffer
        self.discarded_after_starttls += len(buf)
        buf.start = buf.end
        self._lines.reset()

    def _end_transaction(self) -> None:
        self._reset_transaction()
        self.state = _READY

    def _refuse(self, reply: Reply) -> None:
        self._out.append(reply.wire)
        self.refusals[reply.code] = self.refusals.get(reply.code, 0) + 1

    def _error(self, reply: Reply) -> None:
        """A client error: refused, and counted against the error budget."""
        self._refuse(reply)
        self._count_error()

    def _count_error(self) -> None:
        self._errors += 1
        if self._errors - self._forgiven >= self.settings.max_errors and \
                self.state is not _CLOSED:
            self._refuse(replies.TOO_MANY_ERRORS)
            self._close("too many errors")

    def _count_overshoot(self) -> None:
        """One RCPT refused for the number of recipients: free to repeat, as a pipelining
        client sends many before it reads the first refusal, but past
        max_recipient_overshoot of them in a session each one also counts as an error."""
        self._overshoot += 1
        if self._overshoot > self.settings.max_recipient_overshoot:
            self._count_error()

    def _count_junk(self) -> None:
        """One junk command was answered (whatever its reply, a syntax error included).

        Like Postfix's smtpd_junk_command_limit: the first `max_junk_commands` of them are
        free; each later one counts as an error too, so a session of nothing but NOOPs
        ends with 421 after max_junk_commands + max_errors of them (the reply to the last
        one is sent first), and a NOOP every few seconds cannot keep it open past the
        command timeout forever. Only a stored message (250 after DATA) resets the
        count; RSET, a new EHLO or a refused message do not. It also forgives the errors
        before it, wrong passwords excepted, as Postfix does; Postfix frees one command
        more (it compares before incrementing).
        """
        self._junk_commands += 1
        if self._junk_commands > self.settings.max_junk_commands:
            self._count_error()

    def _close(self, reason: str) -> None:
        self.state = _CLOSED
        self._close_reason = reason


_INFORMATIONAL = (Reset,)


_HANDLERS: dict[str, Callable[[SmtpServerConnection, str], object | None]] = {
    "HELO": SmtpServerConnection._helo_cmd, "EHLO": SmtpServerConnection._ehlo_cmd,
    "MAIL": SmtpServerConnection._mail_cmd, "RCPT": SmtpServerConnection._rcpt_cmd,
    "DATA": SmtpServerConnection._data_cmd, "RSET": SmtpServerConnection._rset_cmd,
    "NOOP": SmtpServerConnection._noop_cmd, "QUIT": SmtpServerConnection._quit_cmd,
    "VRFY": SmtpServerConnection._vrfy_cmd, "HELP": SmtpServerConnection._help_cmd,
}
_HANDLERS_STARTTLS = {**_HANDLERS, "STARTTLS": SmtpServerConnection._starttls_cmd}
_HANDLER_SETS = {  # (STARTTLS offered, AUTH offered) -> the handlers
    (False, False): _HANDLERS,
    (True, False): _HANDLERS_STARTTLS,
    (False, True): {**_HANDLERS, "AUTH": SmtpServerConnection._auth_cmd},
    (True, True): {**_HANDLERS_STARTTLS, "AUTH": SmtpServerConnection._auth_cmd},
}
