"""STARTTLS in the sans-IO core (RFC 3207): offer, refusals, the switch, and what is
dropped at it. Every scenario runs in each chunking of `support.smtpdriver.MODES`."""

from __future__ import annotations

import pytest
from support.smtpdriver import EHLO, HELLO, MAIL, MODES, RCPT, Client, hold, reject, wire

from minismtp.smtp import replies as R
from minismtp.smtp.events import (
    NEED_DATA, PAUSED, DataStarted, Envelope, Hello, MailFrom, RcptTo, StartTls,
)
from minismtp.smtp.protocol import Settings, SmtpServerConnection, State

TLS = "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"
EHLO_TLS = R.ehlo("mx.test", Settings().max_message_bytes, True).wire
EHLO_PLAIN = R.ehlo("mx.test", Settings().max_message_bytes).wire
INJECTED = b"MAIL FROM:<a@b>\r\n"


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


def switched(client: Client, description: str = TLS) -> None:
    """What the I/O layer does once the 220 is out and the handshake is done."""
    assert client.conn.awaiting_tls
    assert client.conn.next_event() is PAUSED
    client.conn.tls_started(description)
    assert not client.conn.awaiting_tls


def test_ehlo_lists_starttls_only_when_offered_and_before_tls(mode):
    assert EHLO_TLS == (b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 33554432\r\n"
                        b"250-STARTTLS\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n"
                        b"250 SMTPUTF8\r\n")
    assert Client(mode).send(EHLO) == EHLO_PLAIN
    client = Client(mode, starttls=True)
    assert client.send(EHLO + b"STARTTLS\r\n") == EHLO_TLS + R.READY_FOR_TLS.wire
    switched(client)
    assert client.send(EHLO) == EHLO_PLAIN  # no STARTTLS under TLS
    assert R.READY_FOR_TLS.wire == b"220 2.0.0 Ready to start TLS\r\n"


def test_implicit_tls_starts_before_the_greeting(mode):
    conn = SmtpServerConnection(Settings(hostname="mx.test", starttls=True, require_tls=True))
    conn.tls_started(TLS)
    conn.greet()
    assert conn.data_to_send() == R.greeting("mx.test").wire
    assert conn.tls == TLS
    conn.receive_data(EHLO + b"STARTTLS\r\n")
    assert conn.next_event() == HELLO
    conn.accept()
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == EHLO_PLAIN + R.TLS_ALREADY_ACTIVE.wire


def test_tls_started_out_of_turn_is_a_bug():
    conn = SmtpServerConnection(Settings(starttls=True))
    conn.greet()
    with pytest.raises(RuntimeError):
        conn.tls_started(TLS)
    conn = SmtpServerConnection(Settings(starttls=True))
    conn.tls_started(TLS)
    with pytest.raises(RuntimeError):
        conn.tls_started(TLS)


def test_injected_commands_after_starttls_are_dropped_and_counted(mode):
    """CVE-2011-0411: commands pipelined after STARTTLS in plaintext are never answered
    or executed, whichever read brought them in."""
    client = Client(mode, starttls=True)
    client.send(EHLO)
    assert client.send(b"STARTTLS\r\n" + INJECTED) == R.READY_FOR_TLS.wire
    switched(client)
    assert client.conn.discarded_after_starttls == len(INJECTED)
    assert client.events == [HELLO, StartTls()]
    assert client.conn.state is State.WAIT_HELO
    # In TLS the session goes on normally, from EHLO.
    assert client.send(EHLO + MAIL) == EHLO_PLAIN + R.SENDER_OK.wire
    assert client.of(MailFrom) == [MailFrom("alice@example.org", None, False, False)]


def test_nothing_after_starttls_means_nothing_dropped(mode):
    client = Client(mode, starttls=True)
    client.send(EHLO + b"STARTTLS\r\n")
    switched(client)
    assert client.conn.discarded_after_starttls == 0


def test_session_starts_afresh_after_tls(mode):
    """RFC 3207 4.2: the HELO and everything learnt before are forgotten."""
    client = Client(mode, starttls=True)
    client.send(EHLO + b"STARTTLS\r\n")
    switched(client)
    assert client.send(MAIL) == R.NEED_HELO.wire
    assert client.send(b"HELO client.example\r\n" + MAIL + RCPT + b"DATA\r\n") == wire(
        R.helo("mx.test"), R.SENDER_OK, R.RECIPIENT_OK, R.START_INPUT)
    assert client.of(DataStarted)[0].envelope == Envelope(
        "client.example", False, "alice@example.org", ("bob@mx.test",), tls=TLS)


def test_plaintext_envelope_has_no_tls(mode):
    client = Client(mode, starttls=True)
    client.send(EHLO + MAIL + RCPT + b"DATA\r\n")
    assert client.of(DataStarted)[0].envelope.tls is None


def test_starttls_before_helo_is_allowed(mode):
    client = Client(mode, starttls=True)
    assert client.send(b"STARTTLS\r\n") == R.READY_FOR_TLS.wire
    switched(client)


STARTTLS_REFUSALS = [
    # not offered: like any extension we lack
    (b"STARTTLS\r\n", {}, R.NOT_IMPLEMENTED),
    (EHLO + MAIL + b"STARTTLS\r\n", {}, R.NOT_IMPLEMENTED),
    # offered
    (b"STARTTLS now\r\n", {"starttls": True}, R.STARTTLS_SYNTAX),
    (EHLO + MAIL + b"STARTTLS\r\n", {"starttls": True}, R.BAD_SEQUENCE),
    (EHLO + MAIL + RCPT + b"STARTTLS\r\n", {"starttls": True}, R.BAD_SEQUENCE),
]


@pytest.mark.parametrize("data, settings, refusal", STARTTLS_REFUSALS)
def test_starttls_refusals(mode, data, settings, refusal):
    client = Client(mode, **settings)
    replies = client.send(data)
    assert replies.endswith(refusal.wire)
    assert not client.of(StartTls)
    assert not client.conn.awaiting_tls


def test_refusal_codes():
    assert R.STARTTLS_SYNTAX.wire == b"501 5.5.4 Syntax: STARTTLS\r\n"
    assert R.TLS_ALREADY_ACTIVE.wire == b"503 5.5.1 Error: TLS already active\r\n"
    assert R.MUST_STARTTLS.wire == b"530 5.7.0 Must issue a STARTTLS command first\r\n"
    assert R.TLS_NOT_AVAILABLE.wire.startswith(b"454 4.7.0 ")


def test_second_starttls_under_tls(mode):
    client = Client(mode, starttls=True)
    client.send(EHLO + b"STARTTLS\r\n")
    switched(client)
    assert client.send(EHLO + b"STARTTLS\r\n") == EHLO_PLAIN + R.TLS_ALREADY_ACTIVE.wire
    assert client.send(b"STARTTLS x\r\n") == R.TLS_ALREADY_ACTIVE.wire


def test_a_decision_may_refuse_starttls(mode):
    """A fault rule's 454: the session stays in plaintext and goes on."""
    client = Client(mode, starttls=True, policy=reject(StartTls, R.TLS_NOT_AVAILABLE))
    assert client.send(EHLO + b"STARTTLS\r\n" + MAIL) == (
        EHLO_TLS + R.TLS_NOT_AVAILABLE.wire + R.SENDER_OK.wire)
    assert client.conn.tls is None and client.conn.discarded_after_starttls == 0
    assert client.send(EHLO) == EHLO_TLS  # still offered


def test_a_421_refusal_closes(mode):
    client = Client(mode, starttls=True, policy=reject(StartTls, R.SHUTTING_DOWN))
    client.send(EHLO + b"STARTTLS\r\n" + MAIL)
    assert client.conn.closed


def test_pipelined_commands_wait_for_the_decision(mode):
    """While StartTls is pending nothing after it is looked at; on accept it is dropped."""
    client = Client(mode, starttls=True, policy=hold(StartTls))
    client.send(EHLO)
    assert client.send(b"STARTTLS\r\n" + INJECTED) == b""
    assert client.answer() == R.READY_FOR_TLS.wire
    switched(client)
    assert client.conn.discarded_after_starttls == len(INJECTED)
    assert client.events == [HELLO, StartTls()]


REQUIRE_TLS_CASES = [
    (MAIL, R.MUST_STARTTLS),
    (RCPT, R.MUST_STARTTLS),
    (b"DATA\r\n", R.MUST_STARTTLS),
    (b"NOOP\r\n", R.OK),
]


@pytest.mark.parametrize("command, reply", REQUIRE_TLS_CASES)
def test_require_tls_before_starttls(mode, command, reply):
    client = Client(mode, starttls=True, require_tls=True)
    assert client.send(EHLO + command) == EHLO_TLS + reply.wire
    assert not client.of(MailFrom) and not client.of(RcptTo)


def test_require_tls_counts_errors(mode):
    client = Client(mode, starttls=True, require_tls=True, max_errors=3)
    client.send(EHLO + MAIL * 3)
    assert client.conn.closed
    assert client.replies.endswith(R.TOO_MANY_ERRORS.wire)


def test_require_tls_satisfied_after_starttls(mode):
    client = Client(mode, starttls=True, require_tls=True)
    client.send(EHLO + b"STARTTLS\r\n")
    switched(client)
    assert client.send(EHLO + MAIL + RCPT) == wire(EHLO_PLAIN, R.SENDER_OK, R.RECIPIENT_OK)
    assert [type(e) for e in client.events] == [Hello, StartTls, Hello, MailFrom, RcptTo]
