"""The sans-IO core, bytes in and events plus reply bytes out (h11's receive_and_get).

Every scenario runs in each chunking of `support.smtpdriver.MODES`: whole, byte by byte, line by
line and at random split points. Replies are compared as exact bytes, by reply name.
"""

from __future__ import annotations

import tracemalloc

import pytest
from support.smtpdriver import (
    EHLO, EHLO_R, HELLO, HELO, MAIL, MODES, OPEN, RCPT, Client, case, ehlo_reply, hold,
    mail_from, mail_param, open_reply, queued, reject, wire,
)

from minismtp.smtp import replies as R
from minismtp.smtp.events import (
    NEED_DATA, PAUSED, BodyChunk, ConnectionClosed, DataStarted, Envelope, Hello, MailFrom,
    MessageEnd, MessageRejected, Quit, RcptTo, Reset,
)
from minismtp.smtp.protocol import MAIL_EXTRA_BYTES, Settings, SmtpServerConnection
from minismtp.smtp.replies import Reply

DENIED = Reply(550, "5.7.1", "Access denied")
USER_UNKNOWN = Reply(550, "5.1.1", "User unknown")
NO_SERVICE = Reply(554, "5.3.2", "No SMTP service here")
HELO_R = R.helo("mx.test")
ALICE = MailFrom("alice@example.org", None, False, False)


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


def test_reply_wire_bytes() -> None:
    """The reply bytes the scenarios below refer to by name, pinned once."""
    assert R.greeting("mx.test").wire == b"220 mx.test ESMTP minismtp\r\n"
    assert EHLO_R == (b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 33554432\r\n250-8BITMIME\r\n"
                      b"250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n")
    assert HELO_R.wire == b"250 mx.test\r\n" and queued("Q1") == b"250 2.0.0 Ok: queued as Q1\r\n"
    assert R.START_INPUT.wire == b"354 End data with <CR><LF>.<CR><LF>\r\n"
    assert R.CLOSING.wire == b"221 2.0.0 Bye\r\n"
    assert R.NO_SERVICE_SEQUENCE.wire == b"503 5.7.0 Error: no service, only QUIT is accepted\r\n"
    assert R.NO_VALID_RECIPIENTS.wire == b"554 5.5.1 Error: no valid recipients\r\n"
    assert R.MESSAGE_TOO_BIG.wire == (
        b"552 5.3.4 Error: message exceeds fixed maximum message size\r\n")
    assert R.LINE_TOO_LONG.wire == b"500 5.5.2 Error: command line too long\r\n"
    assert R.BARE_LF_COMMAND.wire.startswith(b"500 5.5.2 ")
    assert R.BARE_LF_DATA.wire.startswith(b"550 5.5.2 ")
    assert R.TOO_MANY_ERRORS.wire.startswith(b"421 4.7.0 ")
    assert (R.UNKNOWN_PARAMETER.code, R.NEED_SMTPUTF8.code, R.TOO_MANY_RECIPIENTS.code) == (
        555, 553, 452)
    assert (R.CANNOT_VRFY.code, R.HELP.code, R.NOT_IMPLEMENTED.code) == (252, 214, 502)


# -- scenarios: send, compare replies (and events) -----------------------------------

HELLO_CASES = [
    case("custom-greeting", EHLO, EHLO_R, greeting=Reply(220, None, "relay ready")),
    case("ehlo", EHLO, EHLO_R, events=[HELLO]),
    case("ehlo-size", EHLO, ehlo_reply(10_240), max_message_bytes=10_240),
    case("helo", HELO, HELO_R, events=[Hello("client.example", extended=False)]),
    case("helo-no-name", b"HELO\r\n" + MAIL, R.HELO_SYNTAX, R.NEED_HELO, events=[]),
    case("ehlo-no-name", b"EHLO\r\n" + MAIL, R.EHLO_SYNTAX, R.NEED_HELO, events=[]),
    case("ehlo-blank-name", b"EHLO   \r\n", R.EHLO_SYNTAX, events=[]),
    case("helo-control-char", b"HELO bad\x01name\r\n", R.HELO_SYNTAX, events=[]),
    case("bare-lf-command", b"EHLO client.example\nNOOP\r\n", R.BARE_LF_COMMAND, R.OK,
         events=[], bare_lf="reject"),
    case("bare-lf-command-allowed", b"EHLO client.example\nNOOP\n", EHLO_R, R.OK,
         events=[HELLO], bare_lf="accept"),
    case("bare-lf-command-normalized", b"EHLO client.example\nNOOP\n", EHLO_R, R.OK,
         events=[HELLO]),  # the default, as Postfix 3.9's
    case("bare-lf-commands-to-data", b"EHLO client.example\nMAIL FROM:<a@b.example>\n"
         b"RCPT TO:<c@mx.test>\nDATA\n", EHLO_R, R.SENDER_OK, R.RECIPIENT_OK, R.START_INPUT,
         bare_lf="normalize"),
    case("ehlo-again-drops-transaction", EHLO + MAIL + RCPT + EHLO + RCPT + b"DATA\r\n",
         EHLO_R, R.SENDER_OK, R.RECIPIENT_OK, EHLO_R, R.NEED_MAIL, R.NEED_MAIL),
]
ORDER_CASES = [
    case("mail-before-helo", MAIL, R.NEED_HELO, events=[]),
    case("rcpt-before-helo", RCPT, R.NEED_MAIL, events=[]),
    case("data-before-helo", b"DATA\r\n", R.NEED_MAIL, events=[]),
    case("rcpt-before-mail", EHLO + RCPT, EHLO_R, R.NEED_MAIL, events=[HELLO]),
    case("data-before-mail", EHLO + b"DATA\r\n", EHLO_R, R.NEED_MAIL, events=[HELLO]),
    case("data-before-rcpt", EHLO + MAIL + b"DATA\r\n", EHLO_R, R.SENDER_OK, R.NEED_RCPT,
         events=[HELLO, ALICE]),
    case("nested-mail", EHLO + MAIL + MAIL, EHLO_R, R.SENDER_OK, R.NESTED_MAIL,
         events=[HELLO, ALICE]),
    case("nested-mail-after-rcpt", EHLO + MAIL + RCPT + MAIL, EHLO_R, R.SENDER_OK,
         R.RECIPIENT_OK, R.NESTED_MAIL),
    case("data-after-rejected-rcpts", EHLO + MAIL + RCPT + b"RCPT TO:<carol@mx.test>\r\nDATA\r\n",
         EHLO_R, R.SENDER_OK, USER_UNKNOWN, USER_UNKNOWN, R.NO_VALID_RECIPIENTS,
         policy=reject(RcptTo, USER_UNKNOWN)),
    case("data-after-one-good-rcpt", EHLO + MAIL + RCPT + b"RCPT TO:<carol@mx.test>\r\nDATA\r\n",
         EHLO_R, R.SENDER_OK, USER_UNKNOWN, R.RECIPIENT_OK, R.START_INPUT,
         policy=reject(RcptTo, USER_UNKNOWN, lambda e: e.recipient == "bob@mx.test")),
    case("rset-mid-transaction", EHLO + MAIL + RCPT + b"RSET\r\n" + RCPT + MAIL
         + b"RCPT TO:<carol@mx.test>\r\nDATA\r\n", EHLO_R, R.SENDER_OK, R.RECIPIENT_OK, R.OK,
         R.NEED_MAIL, R.SENDER_OK, R.RECIPIENT_OK, R.START_INPUT,
         events=[HELLO, ALICE, RcptTo("bob@mx.test"), Reset(), ALICE, RcptTo("carol@mx.test"),
                 DataStarted(Envelope("client.example", True, "alice@example.org",
                                      ("carol@mx.test",)))]),
    case("rset-outside-transaction", b"RSET\r\n" + EHLO + b"RSET\r\nRSET now\r\n",
         R.OK, EHLO_R, R.OK, R.NO_ARGUMENTS, events=[HELLO]),
    case("data-argument-then-data", EHLO + MAIL + RCPT + b"DATA now\r\nDATA\r\n", EHLO_R,
         R.SENDER_OK, R.RECIPIENT_OK, R.NO_ARGUMENTS, R.START_INPUT,
         events=[HELLO, ALICE, RcptTo("bob@mx.test"), DataStarted(Envelope(
             "client.example", True, "alice@example.org", ("bob@mx.test",)))]),
    case("case-insensitive", b"ehlo client.example\r\nmail from:<alice@example.org> size=10 "
         b"body=8bitmime\r\nrCpT tO:<bob@mx.test>\r\ndata\r\nhi\r\n.\r\nnoop\r\nQuIt\r\n",
         EHLO_R, R.SENDER_OK, R.RECIPIENT_OK, R.START_INPUT, queued("Q1"), R.OK, R.CLOSING),
]


PATH_CASES = [
    mail_from(b"<>", ""),
    mail_from(b"<@relay.example,@hop.example:alice@example.org>", "alice@example.org"),
    mail_from(b'<"john q. doe"@example.org>', '"john q. doe"@example.org'),
    mail_from(b'<"odd <> \\" chars"@example.org>', '"odd <> \\" chars"@example.org'),
    mail_from(b" <alice@[192.0.2.1]>", "alice@[192.0.2.1]"),
    mail_from(b"<" + b"a" * 242 + b"@example.org>", "a" * 242 + "@example.org"),  # 256 octets
    mail_from("<jörg@exämple.org> SMTPUTF8".encode(), "jörg@exämple.org", smtputf8=True),
    mail_from(b"<alice@example.org> SIZE=2000", "alice@example.org", size=2000),
    mail_from(b"<alice@example.org> size=0 BODY=8BITMIME", "alice@example.org", size=0,
              body_8bitmime=True),
    mail_from(b"<alice@example.org> body=8bitmime", "alice@example.org", body_8bitmime=True),
    mail_from(b"<alice@example.org> BODY=7BIT", "alice@example.org"),
    case("mail-no-arg", EHLO + b"MAIL\r\n", EHLO_R, R.MAIL_SYNTAX),
    case("mail-no-colon", EHLO + b"MAIL FROM alice@example.org\r\n", EHLO_R, R.MAIL_SYNTAX),
    case("mail-to", EHLO + b"MAIL TO:<alice@example.org>\r\n", EHLO_R, R.MAIL_SYNTAX),
    case("rcpt-no-arg", EHLO + MAIL + b"RCPT\r\n", EHLO_R, R.SENDER_OK, R.RCPT_SYNTAX),
    case("rcpt-from", EHLO + MAIL + b"RCPT FROM:<b@mx.test>\r\n", EHLO_R, R.SENDER_OK,
         R.RCPT_SYNTAX),
    case("rcpt-null", EHLO + MAIL + b"RCPT TO:<>\r\n", EHLO_R, R.SENDER_OK, R.BAD_RECIPIENT),
    case("rcpt-postmaster", EHLO + MAIL + b"RCPT TO:<Postmaster>\r\n", EHLO_R, R.SENDER_OK,
         R.RECIPIENT_OK, events=[HELLO, ALICE, RcptTo("Postmaster")]),
    case("rcpt-params", EHLO + MAIL + b"RCPT TO:<bob@mx.test> NOTIFY=NEVER\r\n", EHLO_R,
         R.SENDER_OK, R.UNKNOWN_PARAMETER),
    case("smtputf8-rcpt", EHLO + "MAIL FROM:<jörg@exämple.org> SMTPUTF8\r\nRCPT TO:<zoë@mx.test>"
         "\r\n".encode(), EHLO_R, R.SENDER_OK, R.RECIPIENT_OK),
    case("non-ascii-needs-smtputf8", EHLO + "MAIL FROM:<jörg@exämple.org>\r\n".encode() + MAIL
         + "RCPT TO:<zoë@mx.test>\r\n".encode(), EHLO_R, R.NEED_SMTPUTF8, R.SENDER_OK,
         R.NEED_SMTPUTF8),
    case("undecodable-address", EHLO + b"MAIL FROM:<j\xf6rg@example.org> SMTPUTF8\r\n", EHLO_R,
         R.BAD_SENDER),
]
PARAM_CASES = [
    *[mail_param(p, R.BAD_PARAMETER_VALUE) for p in (
        b"BODY=9BIT", b"BODY", b"SIZE=big", b"SIZE=", b"SIZE=-1", b"SIZE=1 SIZE=2",
        b"SMTPUTF8=yes")],
    *[mail_param(p, R.UNKNOWN_PARAMETER) for p in (b"FOO=BAR", b"RET=HDRS", b"AUTH=<>")],
    # Keywords and values in ASCII letters only (RFC 5321 2.4): "ſ" and "ı" upper-case
    # to S and I in Python, yet are no keyword here; parameters are split at spaces only.
    *[mail_param(p.encode(), R.UNKNOWN_PARAMETER) for p in ("ſIZE=10", "SMTPUTFſ")],
    *[mail_param(p.encode(), R.BAD_PARAMETER_VALUE) for p in (
        "BODY=8bıtmıme", "SIZE=10\u00a0BODY=8BITMIME", "SIZE=10\x1cBODY=8BITMIME")],
    mail_param(b"SIZE=2000", R.SENDER_OK, max_message_bytes=2000),
    *[case("after-helo-" + p.decode(), HELO + b"MAIL FROM:<alice@example.org> " + p + b"\r\n",
           HELO_R, R.UNKNOWN_PARAMETER) for p in (b"SIZE=10", b"BODY=8BITMIME", b"SMTPUTF8")],
    # Over the size limit is 552, changes no state, and is no error (max_errors=2).
    case("size-over-limit", EHLO + b"MAIL FROM:<alice@example.org> SIZE=2001\r\n" + RCPT + MAIL,
         ehlo_reply(2000), R.MESSAGE_TOO_BIG, R.NEED_MAIL, R.SENDER_OK,
         max_message_bytes=2000, max_errors=2),
]


@pytest.mark.parametrize("data, expected, events, client",
                         HELLO_CASES + ORDER_CASES + PATH_CASES + PARAM_CASES)
def test_scenario(mode: str, data: bytes, expected: tuple, events: list | None,
                  client: dict) -> None:
    c = Client(mode, **client)
    assert c.send(data) == wire(*expected)
    if events is not None:
        assert c.events == events
    assert not c.conn.closed or expected[-1] == R.CLOSING


BAD_PATHS = [
    b"alice@example.org", b"<alice@example.org>junk", b"<alice@example.org", b"<alice@>",
    b"<alice>", b"<@example.org>", b"<alice@.example.org>", b"<<alice@example.org>>",
    b"<ali\x01ce@example.org>", b"<ali\x7fce@example.org>", b"<ali ce@example.org>",
    b"<" + b"a" * 243 + b"@example.org>",  # 257 octets: RFC 5321 4.5.3.1.3
]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_bad_paths_get_501(mode: str, path: bytes) -> None:
    c = Client(mode)
    assert c.send(EHLO + b"MAIL FROM:" + path + b"\r\n" + MAIL) == wire(
        EHLO_R, R.BAD_SENDER, R.SENDER_OK)
    assert c.send(b"RCPT TO:" + path + b"\r\n") == R.BAD_RECIPIENT.wire
    assert c.events == [HELLO, ALICE]


SIMPLE = [
    (b"NOOP\r\n", R.OK), (b"NOOP whatever\r\n", R.OK), (b"VRFY bob\r\n", R.CANNOT_VRFY),
    (b"VRFY\r\n", R.VRFY_SYNTAX), (b"HELP\r\n", R.HELP), (b"HELP MAIL\r\n", R.HELP),
    (b"EXPN staff\r\n", R.NOT_IMPLEMENTED), (b"STARTTLS\r\n", R.NOT_IMPLEMENTED),
    (b"AUTH PLAIN AGJvYgBzZWNyZXQ=\r\n", R.NOT_IMPLEMENTED), (b"XYZZY\r\n", R.UNRECOGNIZED),
    (b"\r\n", R.UNRECOGNIZED), (b"   \r\n", R.UNRECOGNIZED),
]


@pytest.mark.parametrize("line, reply", SIMPLE)
@pytest.mark.parametrize("before", [b"", EHLO + MAIL], ids=["start", "in-mail"])
def test_simple_commands_in_any_state(mode: str, before: bytes, line: bytes,
                                      reply: Reply) -> None:
    c = Client(mode)
    c.send(before)
    assert c.send(line) == reply.wire


@pytest.mark.parametrize("line", [b"GET / HTTP/1.1", b"POST /form HTTP/1.1",
                                  b"CONNECT mx.test:25 HTTP/1.1", b"post /x HTTP/1.0"])
@pytest.mark.parametrize("before", [b"", EHLO + MAIL], ids=["start", "in-mail"])
def test_an_http_request_line_closes_the_session(mode: str, before: bytes, line: bytes) -> None:
    """A browser made to post to us (cross-protocol, ALPACA) gets 221 and the close: the
    lines after it (the request's headers and a body of SMTP commands) are never run."""
    c = Client(mode)
    c.send(before)
    seen = len(c.events)
    smuggled = b"Host: x\r\n\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@mx.test>\r\nDATA\r\n"
    assert c.send(line + b"\r\n" + smuggled) == R.NOT_SMTP.wire
    assert c.conn.closed and c.conn.close_reason == "refused: not SMTP"
    assert c.conn.foreign_protocol == "HTTP request"
    assert c.events[seen:] == [ConnectionClosed("refused: not SMTP")]  # and nothing else


# -- greeting ------------------------------------------------------------------------

def test_421_greeting_closes_at_once(mode: str) -> None:
    c = Client(mode, greeting=R.TOO_MANY_CONNECTIONS)
    assert c.greeting == R.TOO_MANY_CONNECTIONS.wire
    assert c.conn.closed and [type(e) for e in c.events] == [ConnectionClosed]
    assert c.send(EHLO + b"QUIT\r\n") == b"" and c.conn.receive_data(b"QUIT\r\n") == 0


@pytest.mark.parametrize("line", [EHLO, HELO, MAIL, RCPT, b"DATA\r\n", b"RSET\r\n",
                                  b"NOOP\r\n", b"VRFY bob\r\n", b"HELP\r\n",
                                  b"EXPN staff\r\n", b"ETRN mx.test\r\n", b"FOO\r\n",
                                  b"STARTTLS\r\n"])
def test_after_554_greeting_only_quit_works(mode: str, line: bytes) -> None:
    """RFC 5321 3.1: 503 to every command but QUIT, unknown and unoffered ones too."""
    c = Client(mode, greeting=NO_SERVICE)
    assert c.greeting == NO_SERVICE.wire
    assert c.send(line + line) == wire(R.NO_SERVICE_SEQUENCE, R.NO_SERVICE_SEQUENCE)
    assert c.send(b"QUIT\r\n") == R.CLOSING.wire
    assert [type(e) for e in c.events] == [Quit, ConnectionClosed]


# -- recipients, QUIT, several messages, pipelining ----------------------------------

def test_recipient_limit(mode: str) -> None:
    c = Client(mode, max_recipients=3, max_errors=2)
    rcpts = b"".join(b"RCPT TO:<r%d@mx.test>\r\n" % i for i in range(5))
    assert c.send(EHLO + MAIL + rcpts + b"DATA\r\n") == wire(
        EHLO_R, R.SENDER_OK, *[R.RECIPIENT_OK] * 3, *[R.TOO_MANY_RECIPIENTS] * 2, R.START_INPUT)
    assert c.of(DataStarted)[0].envelope.recipients == ("r0@mx.test", "r1@mx.test", "r2@mx.test")


def test_quit_closes_and_later_bytes_are_ignored(mode: str) -> None:
    c = Client(mode)
    assert c.send(EHLO + b"QUIT\r\nNOOP\r\n" + MAIL) == wire(EHLO_R, R.CLOSING)
    assert c.events[:2] == [HELLO, Quit()] and isinstance(c.events[2], ConnectionClosed)
    assert c.send(b"NOOP\r\n") == b"" and c.conn.receive_data(b"NOOP\r\n") == 0


def test_several_messages_get_distinct_queue_ids(mode: str) -> None:
    c = Client(mode)
    message = MAIL + RCPT + b"DATA\r\n%s\r\n.\r\n"
    assert c.send(EHLO + message % b"first" + message % b"second" + b"QUIT\r\n") == wire(
        EHLO_R, *[R.SENDER_OK, R.RECIPIENT_OK, R.START_INPUT, queued("Q1")],
        *[R.SENDER_OK, R.RECIPIENT_OK, R.START_INPUT, queued("Q2")], R.CLOSING)
    assert c.bodies == [b"first\r\n", b"second\r\n"]
    assert c.of(MessageEnd) == [MessageEnd(7), MessageEnd(8)]


def test_pipelined_session_is_answered_in_one_batch() -> None:
    c = Client("whole")
    c.send(EHLO + MAIL + RCPT + b"RCPT TO:<carol@mx.test>\r\nNOOP\r\nDATA\r\n")
    assert c.batches[1:] == [wire(EHLO_R, R.SENDER_OK, R.RECIPIENT_OK, R.RECIPIENT_OK, R.OK,
                                  R.START_INPUT)]
    c.send(b"body\r\n.\r\n" + MAIL + RCPT + b"RSET\r\nQUIT\r\n")
    assert c.batches[2:] == [wire(queued("Q1"), R.SENDER_OK, R.RECIPIENT_OK, R.OK, R.CLOSING)]


def test_pending_decision_holds_back_later_replies(mode: str) -> None:
    c = Client(mode, policy=hold(RcptTo))
    assert c.send(EHLO + MAIL + RCPT + b"NOOP\r\nXYZZY\r\nRSET\r\n") == wire(EHLO_R, R.SENDER_OK)
    assert c.conn.next_event() is PAUSED and c.conn.next_event() is PAUSED
    assert c.conn.data_to_send() == b""
    assert c.answer(USER_UNKNOWN) == wire(USER_UNKNOWN, R.OK, R.UNRECOGNIZED, R.OK)
    assert c.events == [HELLO, ALICE, RcptTo("bob@mx.test"), Reset()]


# -- rejecting each decision; shutdown and disconnect --------------------------------

@pytest.mark.parametrize("kind, reply, data, expected", [
    (Hello, DENIED, EHLO + MAIL, [DENIED, R.NEED_HELO]),
    (MailFrom, DENIED, EHLO + MAIL + RCPT, [EHLO_R, DENIED, R.NEED_MAIL]),
    (RcptTo, USER_UNKNOWN, OPEN, [EHLO_R, R.SENDER_OK, USER_UNKNOWN, R.NO_VALID_RECIPIENTS]),
    # A refused DATA leaves the envelope as it was: DATA may be tried again, RSET drops it.
    (DataStarted, R.LOCAL_ERROR, OPEN + b"DATA\r\nRSET\r\n" + RCPT,
     [EHLO_R, R.SENDER_OK, R.RECIPIENT_OK, R.LOCAL_ERROR, R.LOCAL_ERROR, R.OK, R.NEED_MAIL]),
    (MessageEnd, R.LOCAL_ERROR, OPEN + b"body\r\n.\r\n" + RCPT + MAIL,
     [open_reply(), R.LOCAL_ERROR, R.NEED_MAIL, R.SENDER_OK]),
    (Quit, Reply(221, "2.0.0", "See you"), EHLO + b"QUIT\r\nNOOP\r\n",
     [EHLO_R, b"221 2.0.0 See you\r\n"]),
])
def test_reject_each_decision(mode: str, kind: type, reply: Reply, data: bytes,
                              expected: list) -> None:
    c = Client(mode, policy=reject(kind, reply))
    assert c.send(data) == wire(*expected)
    assert c.conn.closed == (kind is Quit)
    if kind is DataStarted:
        assert len(c.of(DataStarted)) == 2 and c.of(Reset) == [Reset()]
    if kind is MessageEnd:
        assert c.bodies == [b"body\r\n"]


@pytest.mark.parametrize("data", [EHLO + MAIL + RCPT + b"NOOP\r\n", OPEN + b"half a bo"])
def test_shutdown_sends_a_last_reply_and_closes(mode: str, data: bytes) -> None:
    c = Client(mode, policy=hold(RcptTo))
    c.send(data)
    c.conn.shutdown(R.SHUTTING_DOWN)
    assert c.conn.data_to_send() == R.SHUTTING_DOWN.wire
    assert isinstance(c.conn.next_event(), ConnectionClosed)
    assert c.conn.receive_data(b"NOOP\r\n") == 0
    with pytest.raises(RuntimeError):
        c.conn.accept()
    c.conn.shutdown(R.TIMEOUT)  # already closed: nothing more is said
    assert c.conn.data_to_send() == b""


def test_disconnect_leaves_the_pending_command_unanswered_and_earlier_replies_out() -> None:
    conn = SmtpServerConnection(Settings(hostname="mx.test"))
    conn.greet()
    conn.receive_data(b"NOOP\r\nQUIT\r\nNOOP\r\n")
    assert isinstance(conn.next_event(), Quit)  # the NOOP answered, QUIT to decide
    conn.disconnect("test")
    assert conn.data_to_send() == R.greeting("mx.test").wire + R.OK.wire  # no 221
    assert conn.next_event() == ConnectionClosed("test") and conn.closed
    assert conn.data_to_send() == b""  # nothing after: the last NOOP is never read


# -- the error budget ----------------------------------------------------------------

def test_error_budget_closes_with_421(mode: str) -> None:
    c = Client(mode, max_errors=4)
    errors = b"XYZZY\r\n" + MAIL + b"HELO\r\n" + b"X" * 600 + b"\r\n"
    assert c.send(errors + b"NOOP\r\n") == wire(
        R.UNRECOGNIZED, R.NEED_HELO, R.HELO_SYNTAX, R.LINE_TOO_LONG, R.TOO_MANY_ERRORS)
    assert isinstance(c.events[-1], ConnectionClosed) and c.conn.closed


def test_default_error_budget_is_20() -> None:
    c = Client()
    assert c.send(b"XYZZY\r\n" * 19 + b"NOOP\r\n") == wire(*[R.UNRECOGNIZED] * 19, R.OK)
    assert c.send(b"XYZZY\r\nNOOP\r\n") == wire(R.UNRECOGNIZED, R.TOO_MANY_ERRORS)


# -- junk commands (Postfix's smtpd_junk_command_limit) ------------------------------

JUNK = [(b"NOOP\r\n", R.OK), (b"RSET\r\n", R.OK), (b"HELP\r\n", R.HELP),
        (b"VRFY bob\r\n", R.CANNOT_VRFY), (EHLO, EHLO_R), (HELO, HELO_R)]


@pytest.mark.parametrize(("line", "reply"), JUNK, ids=[j[0].split()[0].decode() for j in JUNK])
def test_junk_past_the_limit_counts_as_errors(mode: str, line: bytes, reply) -> None:
    c = Client(mode, max_junk_commands=3, max_errors=2)
    # three free, then each one is answered as usual and counts as an error: at the
    # second error the reply is followed by 421 and the session is over
    assert c.send(line * 4) == wire(*[reply] * 4)
    assert not c.conn.closed
    assert c.send(line + b"NOOP\r\n") == wire(reply, R.TOO_MANY_ERRORS)
    assert c.conn.closed and isinstance(c.events[-1], ConnectionClosed)


def test_default_junk_limit_is_100_then_the_error_budget() -> None:
    assert Settings().max_junk_commands == 100
    c = Client()
    assert c.send(b"NOOP\r\n" * 119) == wire(*[R.OK] * 119)  # 100 free + 19 errors
    assert c.send(b"NOOP\r\nNOOP\r\n") == wire(R.OK, R.TOO_MANY_ERRORS)  # the 20th


def test_junk_and_other_errors_share_the_budget(mode: str) -> None:
    c = Client(mode, max_junk_commands=1, max_errors=3)
    assert c.send(b"NOOP\r\nXYZZY\r\nNOOP\r\n") == wire(R.OK, R.UNRECOGNIZED, R.OK)
    # a junk command with bad syntax is both an error and junk, as in Postfix
    assert c.send(b"RSET x\r\nNOOP\r\n") == wire(R.NO_ARGUMENTS, R.TOO_MANY_ERRORS)
    assert c.conn.closed


def test_mail_rcpt_data_and_quit_are_not_junk(mode: str) -> None:
    c = Client(mode, max_junk_commands=1, max_errors=1)
    session = OPEN + b"body\r\n.\r\n" + MAIL + RCPT + b"RSET\r\n" + MAIL + b"QUIT\r\n"
    assert c.send(session) == wire(EHLO_R, R.SENDER_OK, R.RECIPIENT_OK, R.START_INPUT,
                                   queued("Q1"), R.SENDER_OK, R.RECIPIENT_OK, R.OK,
                                   R.SENDER_OK, R.CLOSING)


def test_a_stored_message_resets_the_junk_count(mode: str) -> None:
    c = Client(mode, max_junk_commands=2, max_errors=1)
    assert c.send(EHLO + b"NOOP\r\n") == wire(EHLO_R, R.OK)  # both free ones used
    assert c.send(MAIL + RCPT + b"DATA\r\nbody\r\n.\r\n") == wire(
        R.SENDER_OK, R.RECIPIENT_OK, R.START_INPUT, queued("Q1"))
    assert c.send(b"NOOP\r\nRSET\r\n") == wire(R.OK, R.OK)  # free again
    assert c.send(b"HELP\r\n") == wire(R.HELP, R.TOO_MANY_ERRORS)


def test_a_stored_message_forgives_earlier_errors(mode: str) -> None:
    """As Postfix does: a client on a long-lived connection (a relay sending thousands of
    messages) is not cut off for errors spread over many messages."""
    c = Client(mode, max_errors=2)
    body = b"DATA\r\nbody\r\n.\r\n"
    assert c.send(EHLO + b"XYZZY\r\n" + MAIL + RCPT + body) == wire(
        EHLO_R, R.UNRECOGNIZED, R.SENDER_OK, R.RECIPIENT_OK, R.START_INPUT, queued("Q1"))
    assert c.send(b"XYZZY\r\n" + MAIL + RCPT + body) == wire(
        R.UNRECOGNIZED, R.SENDER_OK, R.RECIPIENT_OK, R.START_INPUT, queued("Q2"))
    assert c.conn.errors == 2 and not c.conn.closed  # the session's count, for its log
    assert c.send(b"XYZZY\r\nXYZZY\r\n") == wire(
        R.UNRECOGNIZED, R.UNRECOGNIZED, R.TOO_MANY_ERRORS)  # two since the last message
    assert c.conn.closed and c.conn.errors == 4


def test_a_refused_message_forgives_no_errors(mode: str) -> None:
    c = Client(mode, max_errors=2, policy=reject(MessageEnd, DENIED))
    assert c.send(EHLO + b"XYZZY\r\n" + MAIL + RCPT + b"DATA\r\nbody\r\n.\r\n") == wire(
        EHLO_R, R.UNRECOGNIZED, R.SENDER_OK, R.RECIPIENT_OK, R.START_INPUT, DENIED)
    assert c.send(b"XYZZY\r\n") == wire(R.UNRECOGNIZED, R.TOO_MANY_ERRORS)


def test_a_refused_message_does_not_reset_the_junk_count(mode: str) -> None:
    c = Client(mode, max_junk_commands=2, max_errors=1, max_message_bytes=10,
               policy=reject(MessageEnd, DENIED))
    assert c.send(EHLO + b"NOOP\r\n") == wire(ehlo_reply(10), R.OK)
    assert c.send(MAIL + RCPT + b"DATA\r\nbody\r\n.\r\n") == wire(
        R.SENDER_OK, R.RECIPIENT_OK, R.START_INPUT, DENIED)
    assert c.send(MAIL + RCPT + b"DATA\r\n" + b"x" * 20 + b"\r\n.\r\n") == wire(
        R.SENDER_OK, R.RECIPIENT_OK, R.START_INPUT, R.MESSAGE_TOO_BIG)
    assert c.send(b"RSET\r\n") == wire(R.OK, R.TOO_MANY_ERRORS)


def test_a_rejected_hello_is_junk_too(mode: str) -> None:
    c = Client(mode, max_junk_commands=0, max_errors=2, policy=reject(Hello, DENIED))
    assert c.send(EHLO) == wire(DENIED)
    assert c.send(HELO) == wire(DENIED, R.TOO_MANY_ERRORS)
    assert c.conn.closed


def test_junk_closing_the_session_mid_pipeline_drops_the_rest(mode: str) -> None:
    c = Client(mode, max_junk_commands=0, max_errors=1)
    assert c.send(b"RSET\r\n" + MAIL + b"NOOP\r\n") == wire(R.OK, R.TOO_MANY_ERRORS)
    assert c.of(MailFrom) == []


def test_a_mail_refused_for_its_size_repeated_is_junk(mode: str) -> None:
    """A MAIL refused for its SIZE can be sent again at no cost: the session may not live
    on such commands forever (each reply restarts the idle clock)."""
    c = Client(mode, max_junk_commands=3, max_errors=2, max_message_bytes=50)
    too_big = b"MAIL FROM:<a@example.org> SIZE=51\r\n"
    c.send(EHLO)  # the first of three free ones
    assert c.send(too_big * 3) == wire(*[R.MESSAGE_TOO_BIG] * 3)  # two free, then an error
    assert not c.conn.closed
    assert c.send(too_big) == wire(R.MESSAGE_TOO_BIG, R.TOO_MANY_ERRORS)  # the second
    assert c.conn.closed


def test_rcpts_past_the_limit_count_as_errors_past_the_overshoot(mode: str) -> None:
    """452 past max_recipients; a pipelining client may send many before it reads one,
    so only past max_recipient_overshoot of them in a session is each one an error."""
    c = Client(mode, max_errors=2, max_recipients=1, max_recipient_overshoot=3)
    c.send(EHLO + MAIL + RCPT)
    assert c.send(RCPT * 4) == wire(*[R.TOO_MANY_RECIPIENTS] * 4)  # three free, one error
    assert c.send(b"RSET\r\n" + MAIL + RCPT + RCPT) == wire(
        R.OK, R.SENDER_OK, R.RECIPIENT_OK, R.TOO_MANY_RECIPIENTS, R.TOO_MANY_ERRORS)
    assert c.conn.closed


def test_rcpts_refused_for_the_clients_rate_count_as_overshoot() -> None:
    """A RCPT over the client's recipients per minute (450, `reject(overshoot=True)`) counts
    as one past max_recipients does: free up to max_recipient_overshoot, then each one an
    error until 421. The same 450 from other policy counts as nothing."""
    rate = R.too_many_recipients_from("192.0.2.7")

    def rcpts(overshoot: bool, count: int) -> list[bytes]:
        conn = SmtpServerConnection(Settings(hostname="mx.test", max_errors=2,
                                             max_recipient_overshoot=3))
        conn.greet()
        conn.receive_data(EHLO + MAIL)
        for kind in (Hello, MailFrom):
            assert isinstance(conn.next_event(), kind)
            conn.accept()
        conn.data_to_send()
        answers = []
        while len(answers) < count and not conn.closed:
            conn.receive_data(RCPT)
            assert isinstance(conn.next_event(), RcptTo)
            conn.reject(rate, overshoot=overshoot)
            answers.append(conn.data_to_send())
        return answers

    assert rcpts(True, 10) == [rate.wire] * 4 + [rate.wire + R.TOO_MANY_ERRORS.wire]
    assert rcpts(False, 10) == [rate.wire] * 10


def test_limits_and_policy_refusals_are_not_errors(mode: str) -> None:
    c = Client(mode, max_errors=1, max_recipients=1, max_message_bytes=50,
               policy=reject(RcptTo, USER_UNKNOWN, lambda e: e.recipient.startswith("x")))
    data = (EHLO + b"MAIL FROM:<a@example.org> SIZE=51\r\n" + MAIL + b"RCPT TO:<x@mx.test>\r\n"
            + RCPT + RCPT + b"DATA\r\n" + b"y" * 60 + b"\r\n.\r\nNOOP\r\n")
    assert c.send(data) == wire(ehlo_reply(50), R.MESSAGE_TOO_BIG, R.SENDER_OK, USER_UNKNOWN,
                                R.RECIPIENT_OK, R.TOO_MANY_RECIPIENTS, R.START_INPUT,
                                R.MESSAGE_TOO_BIG, R.OK)
    assert not c.conn.closed


# -- the command line limit -------------------------------------------------------

@pytest.mark.parametrize("limit", [512, 64])
def test_line_of_exactly_the_limit_is_accepted(mode: str, limit: int) -> None:
    c = Client(mode, max_command_bytes=limit)
    line = b"NOOP " + b"x" * (limit - 7) + b"\r\n"
    over = b"NOOP " + b"x" * (limit - 6) + b"\r\n"
    assert len(line) == limit and len(over) == limit + 1
    assert c.send(line + over + line) == wire(R.OK, R.LINE_TOO_LONG, R.OK)


def test_mail_has_room_for_its_parameters_and_other_commands_do_not(mode: str) -> None:
    """A 256-octet path with SIZE, BODY and SMTPUTF8 exceeds 512 octets: RFC 1870, 4954
    and 6531 let MAIL take MAIL_EXTRA_BYTES more (AUTH= alone may add 500). RCPT, or
    any other command, of the same length is still too long."""
    c = Client(mode)
    path = "a" * 60 + "@" + "b" * 189 + ".org"
    assert len(path) + 2 <= 256
    mail = f"MAIL FROM:<{path}> SIZE=1000 BODY=8BITMIME SMTPUTF8 ".encode()
    mail += b" " * (512 + MAIL_EXTRA_BYTES - len(mail) - 2) + b"\r\n"
    assert len(mail) == 512 + MAIL_EXTRA_BYTES
    rcpt = b"RCPT TO:<bob@mx.test>" + b" " * (600 - 21 - 2) + b"\r\n"
    over = mail[:-2] + b" \r\n"
    assert c.send(EHLO + mail + rcpt + RCPT + b"RSET\r\n" + over + b"NOOP\r\n") == wire(
        EHLO_R, R.SENDER_OK, R.LINE_TOO_LONG, R.RECIPIENT_OK, R.OK, R.LINE_TOO_LONG, R.OK)
    assert c.conn.errors == 2


@pytest.mark.parametrize("line", ["MAıL FROM:<a@b.example>", "quıt", "ſTARTTLS",
                                  "EHLO\u00a0client.example"])
def test_verbs_are_ascii_letters_only(mode: str, line: str) -> None:
    """Python upper-cases "ı" (dotless i) to I and "ſ" (long s) to S; RFC 5321 2.4 makes
    verbs ASCII, and a filter in front of us would see an unknown command: so do we."""
    c = Client(mode, starttls=True)
    assert c.send(EHLO + line.encode() + b"\r\n" + b"NOOP\r\n") == wire(
        R.ehlo("mx.test", Settings().max_message_bytes, starttls=True).wire, R.UNRECOGNIZED,
        R.OK)
    assert not c.conn.closed and not c.conn.awaiting_tls


def test_data_with_no_valid_recipients_is_not_a_protocol_error(mode: str) -> None:
    """RFC 2920 3.1: a pipelining client sends DATA before it learns that every RCPT was
    refused; its 554 is the expected outcome, not an error. 25 such transactions in a
    session with max_errors 20 leave it open."""
    c = Client(mode, policy=reject(RcptTo, USER_UNKNOWN))
    attempt = MAIL + RCPT + b"DATA\r\n" + b"RSET\r\n"
    assert c.send(EHLO + attempt * 25 + b"NOOP\r\n") == wire(
        EHLO_R, *[R.SENDER_OK, USER_UNKNOWN, R.NO_VALID_RECIPIENTS, R.OK] * 25, R.OK)
    assert c.conn.errors == 0 and not c.conn.closed


def test_repeating_data_after_refused_recipients_ends_in_421(mode: str) -> None:
    """Each 554 is free as a junk command is, not without end: past max_junk_commands
    (EHLO is the first) they count as errors, and the session ends at max_errors."""
    c = Client(mode, policy=reject(RcptTo, USER_UNKNOWN), max_junk_commands=3, max_errors=2)
    out = c.send(EHLO + MAIL + RCPT + b"DATA\r\n" * 8)
    assert out == wire(EHLO_R, R.SENDER_OK, USER_UNKNOWN, *[R.NO_VALID_RECIPIENTS] * 4,
                       R.TOO_MANY_ERRORS)
    assert c.conn.closed


@pytest.mark.parametrize("chunk", [1000, 4096, 4097, 65536])
def test_endless_line_gets_one_reply_and_no_memory(chunk: int) -> None:
    c = Client("whole")
    capacity = c.conn.buffer.capacity
    piece, out = b"A" * chunk, b""
    for _ in range(3 * 2**20 // chunk + 1):
        out += c.send(piece)
        assert c.conn.buffer.capacity == capacity and len(c.conn.buffer) < 512 + MAIL_EXTRA_BYTES
    assert out == R.LINE_TOO_LONG.wire
    assert c.send(b"\r\nNOOP\r\n") == R.OK.wire


# -- DATA ----------------------------------------------------------------------------

@pytest.mark.parametrize("stuffed, body", [
    (b"Subject: dots\r\n\r\n..\r\n...three\r\n.x\r\nmid.dle\r\n \r\n.\r\n",
     b"Subject: dots\r\n\r\n.\r\n..three\r\nx\r\nmid.dle\r\n \r\n"),
    (b"..starts with a dot\r\n.\r\n", b".starts with a dot\r\n"),
    (b".\r\n", b""),
    (b"\r\n.\r\n", b"\r\n"),
    (b"bin\x00\xff\x80\rary\r\r\n.\r\n", b"bin\x00\xff\x80\rary\r\r\n"),
])
def test_body_is_delivered_unstuffed(mode: str, stuffed: bytes, body: bytes) -> None:
    c = Client(mode)
    assert c.send(OPEN + stuffed + b"NOOP\r\n") == wire(open_reply(), queued("Q1"), R.OK)
    assert c.bodies == [body] and c.of(MessageEnd) == [MessageEnd(len(body))]
    assert c.of(BodyChunk) == ([BodyChunk(body)] if body else [])


@pytest.mark.parametrize("tail, body", [(b"line\r\n.\r\nNOOP\r\n", b"line\r\n"),
                                        (b"..\r\n.\r\nNOOP\r\n", b".\r\n"),
                                        (b".\r\nNOOP\r\n", b"")])
def test_terminator_split_at_every_offset(tail: bytes, body: bytes) -> None:
    for cut in range(len(tail) + 1):
        c = Client("whole")
        c.send(OPEN)
        c.send(tail[:cut])
        c.send(tail[cut:])
        assert c.replies == wire(open_reply(), queued("Q1"), R.OK), cut
        assert c.bodies == [body], cut


@pytest.mark.parametrize("size", [100, 101])
def test_body_size_limit_is_inclusive(mode: str, size: int) -> None:
    c = Client(mode, max_message_bytes=100)
    c.send(OPEN)
    end = queued("Q1") if size <= 100 else R.MESSAGE_TOO_BIG.wire
    assert c.send(b"x" * (size - 2) + b"\r\n.\r\n") == end


def test_oversized_body_is_refused_after_its_end(mode: str) -> None:
    c = Client(mode, max_message_bytes=100)
    c.send(OPEN)
    body = b"".join(b"line %03d 0123456789\r\n" % i for i in range(20))
    assert c.send(body) == b""  # never answered before the terminator
    delivered = b"".join(c.chunks)
    assert len(delivered) <= 100 and body.startswith(delivered)
    assert c.send(b".\r\n" + MAIL) == wire(R.MESSAGE_TOO_BIG, R.SENDER_OK)
    assert c.events[-2:] == [MessageRejected(len(body), "message too big"), ALICE]
    assert not c.of(MessageEnd)


def test_bare_lf_in_body_is_refused_after_its_end(mode: str) -> None:
    c = Client(mode, bare_lf="reject")
    c.send(OPEN)
    assert c.send(b"one\ntwo\r\n") == b""
    assert c.send(b".\r\nNOOP\r\n") == wire(R.BARE_LF_DATA, R.OK)
    assert c.of(MessageRejected) == [MessageRejected(9, "bare LF in body")]


def test_bare_lf_in_body_is_kept_when_allowed(mode: str) -> None:
    c = Client(mode, bare_lf="accept")
    assert c.send(OPEN + b"one\ntwo\n\r\n.\r\n").endswith(queued("Q1"))
    assert c.bodies == [b"one\ntwo\n\r\n"]


# (client bytes after DATA up to its end, the body handed on) under "normalize"
NORMALIZED = [
    (b"one\ntwo\n\r\n.\r\n", b"one\r\ntwo\r\n\r\n"),  # curl --upload-file, LF file
    (b"one\ntwo\r\n.\r\n", b"one\r\ntwo\r\n"),  # smtplib: bytes as given, then CRLF.CRLF
    (b"\n\n\r\n.\r\n", b"\r\n\r\n\r\n"),  # empty lines, a body opening with one
    (b"a\n..b\n..\r\n.\r\n", b"a\r\n.b\r\n.\r\n"),  # stuffed after a bare LF: unstuffed
    (b"a\n.b\r\n.\r\n", b"a\r\nb\r\n"),  # a line start is a line start
    (b".\n.\r\n.\r\n", b"\r\n\r\n"),  # ".\n" first, then ".\r\n" after a bare LF: no end
    (b"a\n.\n.\r\n.\r\n", b"a\r\n\r\n\r\n"),
    (b"a\r\r\nb\rc\n\r\n.\r\n", b"a\r\r\nb\rc\r\n\r\n"),  # a bare CR stays as it is
]


@pytest.mark.parametrize("data, body", NORMALIZED)
def test_bare_lf_in_body_is_a_line_end_when_normalized(mode: str, data: bytes, body: bytes
                                                       ) -> None:
    c = Client(mode, bare_lf="normalize")
    assert c.send(OPEN + data + b"NOOP\n") == wire(open_reply(), queued("Q1"), R.OK)
    assert c.bodies == [body]
    assert c.of(MessageEnd) == [MessageEnd(len(body))]  # the size of what is handed on
    for before, after in zip(c.chunks, c.chunks[1:]):  # what sinks rely on
        assert not (before.endswith(b"\r") and after.startswith(b"\n")), (before, after)


def test_normalized_body_counts_against_the_size_limit_as_handed_on(mode: str) -> None:
    c = Client(mode, bare_lf="normalize", max_message_bytes=12)
    c.send(OPEN)
    assert c.send(b"123456789\n\r\n.\r\n") == R.MESSAGE_TOO_BIG.wire  # 12 bytes sent, 13 kept
    assert c.send(MAIL + RCPT + b"DATA\r\n12345678\n\r\n.\r\n") == wire(
        R.SENDER_OK, R.RECIPIENT_OK, R.START_INPUT, queued("Q1"))
    assert c.bodies[-1] == b"12345678\r\n\r\n"


# Past the limit: bare LFs, a dot after one (dropped), a dot after a CRLF (kept), a bare CR.
OVER_THE_LIMIT = b"\n" * 40 + b"a\n.b\r\n..c\n\n.\r\r\n" * 5


def test_past_the_size_limit_a_normalized_body_counts_as_it_would_be_handed_on(
        mode: str) -> None:
    """Once a body is over the limit it is counted, not normalized: the 552 and the size
    are those of the body as it would have been handed on, in any chunking."""
    c = Client(mode, bare_lf="normalize", max_message_bytes=12)
    data = b"0123456789\n" + OVER_THE_LIMIT + b"\r\n.\r\n"
    # As handed on: each LF made CRLF, the dot after a bare LF dropped, the scanner's
    # stuffing dot after a CRLF dropped too, and the CRLF before the end is body.
    body = b"0123456789\r\n" + b"\r\n" * 40 + b"a\r\nb\r\n.c\r\n\r\n\r\r\n" * 5 + b"\r\n"
    assert c.send(OPEN + data + b"NOOP\r\n") == wire(open_reply(12), R.MESSAGE_TOO_BIG, R.OK)
    assert c.of(MessageRejected) == [MessageRejected(len(body), "message too big")]
    assert c.bodies[0] in (b"", b"0123456789\r\n")  # what fitted, in pieces that came alone


def test_past_the_size_limit_bare_lfs_are_counted_in_place() -> None:
    """A body of bare LFs past the limit costs no copy of its pieces (normalizing one
    would make two: the piece as bytes, and twice its size rewritten)."""
    conn = SmtpServerConnection(Settings(hostname="mx.test", bare_lf="normalize",
                                         max_message_bytes=1000))
    conn.greet()
    stream = memoryview(OPEN + b"x" * 300_000 + b"\n" * 1_000_000 + b"\r\n.\r\n")
    rejected, peaks = [], []
    while stream:
        view = conn.buffer.free_view()
        n = min(len(view), len(stream))
        view[:n], stream = stream[:n], stream[n:]
        conn.buffer.commit(n)
        traced = conn.buffer.capacity == conn.settings.data_buffer_bytes  # grown for DATA
        if traced:
            tracemalloc.start()
        while (event := conn.next_event()) not in (NEED_DATA, PAUSED):
            if isinstance(event, MessageRejected):
                rejected.append(event)
            elif type(event) in (Hello, MailFrom, RcptTo, DataStarted):
                conn.accept()
        if traced:
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
    assert rejected == [MessageRejected(300_000 + 2_000_000 + 2, "message too big")]
    assert len(peaks) >= 4 and max(peaks) < 16 * 1024, peaks  # reads of 256 KiB each


@pytest.mark.parametrize("bare_lf", ["normalize", "reject", "accept"])
def test_a_bare_lf_deep_in_a_large_body_of_long_lines(bare_lf: str) -> None:
    """Pieces of the 256 KiB DATA buffer hop from LF to LF over long lines
    (scanner.has_bare_lf): a bare LF among them is found as in small pieces, under each
    policy (the same bytes give the same pieces whatever the policy)."""
    line = b"x" * 998 + b"\r\n"
    body = line * 60 + b"y" * 500 + b"\n" + line * 40
    c = Client(bare_lf=bare_lf)
    c.send(OPEN)
    reply = c.send(body + b".\r\n")
    if bare_lf == "reject":  # refused: nothing after the piece with the LF is handed on
        assert reply == R.BARE_LF_DATA.wire
    else:
        assert max(len(chunk) for chunk in c.chunks) >= 16 * 1024  # the hopping path ran
        assert reply == queued("Q1")
        assert c.bodies == [body.replace(b"y\n", b"y\r\n") if bare_lf == "normalize"
                            else body]


SMUGGLED = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@mx.test>\r\nDATA\r\nforged\r\n"


@pytest.mark.parametrize("fake_end, kept", [
    (b"\n.\n", b"\n.\n"), (b"\r\n.\n", b"\r\n\n"),  # the dot after CRLF is a stuffing dot
    (b"\n.\r\n", b"\n.\r\n"), (b"\r.\r\n", b"\r.\r\n"),
])
@pytest.mark.parametrize("bare_lf", ["normalize", "reject", "accept"])
def test_smuggled_end_of_data_is_body(mode: str, fake_end: bytes, kept: bytes,
                                      bare_lf: str) -> None:
    c = Client(mode, bare_lf=bare_lf)
    data = b"Subject: hi\r\n\r\nhello" + fake_end + SMUGGLED + b".\r\nQUIT\r\n"
    has_bare_lf = b"\n" in fake_end.replace(b"\r\n", b"")
    refused = bare_lf == "reject" and has_bare_lf
    end = R.BARE_LF_DATA.wire if refused else queued("Q1")
    assert c.send(OPEN + data) == wire(open_reply(), end, R.CLOSING)
    assert c.of(MailFrom) == [ALICE] and len(c.of(DataStarted)) == 1
    if bare_lf == "normalize":  # each fake end is an empty line, its dot unstuffed
        empty_line = b"\r\n\r\n" if has_bare_lf else b"\r.\r\n"
        assert c.bodies == [b"Subject: hi\r\n\r\nhello" + empty_line + SMUGGLED]
    elif not refused:
        assert c.bodies == [b"Subject: hi\r\n\r\nhello" + kept + SMUGGLED]


def test_body_chunks_stay_valid_until_the_next_read() -> None:
    conn = SmtpServerConnection(Settings(hostname="mx.test"))
    conn.greet()
    body = b"".join(b"%06d ....+....+....+....+....+....+....+....+\r\n" % i for i in range(6000))
    stream, views, got = OPEN + body + b".\r\n", [], b""
    while stream:
        view = conn.buffer.free_view()
        n = min(len(view), 16384, len(stream))
        view[:n], stream = stream[:n], stream[n:]
        conn.buffer.commit(n)
        while (event := conn.next_event()) not in (NEED_DATA, PAUSED):
            if isinstance(event, BodyChunk):
                views.append(event.data)  # gathered, written after the read is drained
            elif type(event) in (Hello, MailFrom, RcptTo, DataStarted, MessageEnd):
                conn.accept("Q1" if isinstance(event, MessageEnd) else None)
        got += b"".join(bytes(v) for v in views)
        views.clear()
    assert got == body and conn.data_to_send().endswith(queued("Q1"))


def test_buffer_grows_for_a_large_body_and_shrinks_after() -> None:
    c = Client("whole")
    c.send(OPEN)
    for _ in range(64):
        c.send(b"z" * 998 + b"\r\n" + b"\x00" * 1000 + b"\r\n")
    c.send(b".\r\nNOOP\r\n")
    assert c.replies.endswith(queued("Q1") + R.OK.wire) and len(c.bodies[0]) == 64 * 2002
    assert c.conn.buffer.capacity == Settings().command_buffer_bytes


def _in_body(settings: Settings = Settings()) -> SmtpServerConnection:
    conn = SmtpServerConnection(settings)
    conn.greet()
    _burst(conn, OPEN)
    assert conn.data_to_send().endswith(R.START_INPUT.wire)
    return conn


def _burst(conn: SmtpServerConnection, data: bytes) -> list[int]:
    """Deliver `data` as the worker reads a socket holding it: into the free view, one read
    after another while each fills the view, draining the core after each; the buffer's
    capacity after each read."""
    capacities = []
    while data:
        n = conn.receive_data(data)
        data = data[n:]
        while (event := conn.next_event()) is not NEED_DATA:
            if isinstance(event, (Hello, MailFrom, RcptTo, DataStarted, MessageEnd)):
                conn.accept("Q1" if isinstance(event, MessageEnd) else None)
        capacities.append(conn.buffer.capacity)
    return capacities


SMALL, LARGE = Settings().command_buffer_bytes, Settings().data_buffer_bytes


def test_a_body_in_small_reads_keeps_the_small_buffer() -> None:
    conn = _in_body()
    for _ in range(2000):  # 124 KB in 62-byte reads: far past the command buffer
        assert _burst(conn, b"Y" * 60 + b"\r\n") == [SMALL]


def test_the_large_buffer_stays_across_partial_reads_until_trimmed() -> None:
    conn = _in_body()
    # 5 KB at once: the first read fills the command buffer, so the body is read in big
    # gulps; the second takes the rest and leaves room. The core cannot tell a body that
    # slowed from one whose next burst is on its way: the large buffer stays ...
    assert _burst(conn, b"X" * 5000 + b"\r\n") == [LARGE, LARGE]
    for _ in range(100):
        assert _burst(conn, b"Y" * 60 + b"\r\n") == [LARGE]
    # ... until the I/O layer, which sees the time between reads, trims it.
    conn.trim_buffer()
    assert conn.buffer.capacity == SMALL
    for _ in range(100):
        assert _burst(conn, b"Y" * 60 + b"\r\n") == [SMALL]
    # A read that fills the small buffer grows it again.
    assert _burst(conn, b"X" * 5000 + b"\r\n") == [LARGE, LARGE]
    _burst(conn, b".\r\nNOOP\r\n")
    assert conn.data_to_send().endswith(queued("Q1") + R.OK.wire)
    assert conn.buffer.capacity == SMALL


@pytest.mark.parametrize("burst", [6000, 16000, 30000])
def test_a_body_in_bursts_is_read_once_per_burst(burst: int) -> None:
    # Bursts of a few KB (most internet clients): after the growth the buffer stays large,
    # so each burst is one read, not a read that fills the small buffer and one more.
    conn = _in_body()
    line = b"x" * 78 + b"\r\n"
    piece = (line * (burst // len(line) + 1))[:burst]
    assert _burst(conn, piece) == [LARGE, LARGE]
    for _ in range(50):
        assert _burst(conn, piece) == [LARGE]


def test_a_body_in_full_reads_gets_the_large_buffer_at_once() -> None:
    conn = _in_body()
    line = b"z" * 998 + b"\r\n"
    body = line * (3 * LARGE // len(line))
    capacities = _burst(conn, body)
    # Every read fills the buffer: large from the first on, as the body streams in; the
    # last left room, and the large buffer stays for the next ...
    assert capacities[0] == LARGE and set(capacities) == {LARGE}
    assert len(capacities) <= 2 + len(body) // LARGE
    assert _burst(conn, b"x" * 100 + b"\r\n") == [LARGE]
    # ... and goes back when the body ends.
    _burst(conn, b".\r\nNOOP\r\n")
    assert conn.data_to_send().endswith(queued("Q1") + R.OK.wire)
    assert conn.buffer.capacity == SMALL


# -- edge cases that once went wrong ---------------------------------------------------------------

def test_refusal_does_not_depend_on_the_chunking() -> None:
    answers = set()
    for sizes in ([1000], [11, 1000]):  # the bare LF at offset 10 is within the 64-byte limit
        c = Client(max_message_bytes=64, bare_lf="reject")
        c.send(OPEN)
        c.send_sized(b"x" * 10 + b"\n" + b"y" * 60 + b"\r\n.\r\n", sizes)
        answers.add(c.replies[-60:])
    assert answers == {R.BARE_LF_DATA.wire[-60:]}


def test_accept_without_queue_id_keeps_the_decision() -> None:
    c = Client("whole", policy=hold(MessageEnd))
    c.send(OPEN + b"body\r\n.\r\n")
    with pytest.raises(ValueError):
        c.conn.accept()
    assert c.conn.next_event() is PAUSED
    c.conn.accept("Q9")
    assert c.conn.data_to_send() == queued("Q9")


def test_source_route_without_mailbox_is_501() -> None:
    c = Client("whole")
    assert c.send(EHLO + b"MAIL FROM:<@relay.example:>\r\n") == wire(EHLO_R, R.BAD_SENDER)


def test_path_limit_counts_octets() -> None:
    c = Client("whole")
    path = ("<" + "ü" * 200 + "@example.org>").encode()
    assert c.send(EHLO + b"MAIL FROM:" + path + b" SMTPUTF8\r\n") == wire(EHLO_R, R.BAD_SENDER)


def test_size_takes_ascii_digits_only() -> None:
    c = Client("whole")
    assert c.send(EHLO + "MAIL FROM:<a@example.org> SIZE=١٠\r\n".encode()) == wire(
        EHLO_R, R.BAD_PARAMETER_VALUE)


def test_reject_with_421_closes_the_session() -> None:
    # RFC 5321 3.8: a 421 reply means the server is closing the transmission channel.
    conn = SmtpServerConnection(Settings())
    conn.greet()
    conn.receive_data(b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nNOOP\r\n")
    assert isinstance(conn.next_event(), Hello)
    conn.accept()
    assert isinstance(conn.next_event(), MailFrom)
    busy = Reply(421, "4.3.2", "go away")
    conn.reject(busy)
    assert isinstance(conn.next_event(), ConnectionClosed)
    assert conn.data_to_send().endswith(busy.wire)  # and no reply to the NOOP
