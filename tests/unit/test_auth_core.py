"""AUTH in the sans-IO core (RFC 4954, PLAIN RFC 4616, LOGIN): the offer, every refusal,
both mechanisms with and without an initial response, the decision, the limits, and
the password kept out of every reply and event text. Every scenario runs in each
chunking of `support.smtpdriver.MODES`."""

from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support.smtpdriver import (
    EHLO, HELLO, MAIL, MODES, RCPT, Client, hold, reject, reply_lines, wire,
)

from minismtp.smtp import replies as R
from minismtp.smtp.events import (
    NEED_DATA, PAUSED, AuthAttempt, ConnectionClosed, DataStarted, Envelope, MailFrom,
)
from minismtp.smtp.protocol import Settings, SmtpServerConnection, State
from minismtp.smtp.replies import Reply

PASSWORD = "s3cret-Pa55"
MECHS = ("PLAIN", "LOGIN")
SIZE = Settings().max_message_bytes
EHLO_AUTH = R.ehlo("mx.test", SIZE, False, MECHS).wire
EHLO_TLS_AUTH = R.ehlo("mx.test", SIZE, True, MECHS).wire
EHLO_TLS = R.ehlo("mx.test", SIZE, True).wire
EHLO_PLAIN = R.ehlo("mx.test", SIZE).wire
TLS = "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)"
OPEN = {"auth_mechanisms": MECHS, "auth_plaintext": True}  # offered without TLS


def b64(data: bytes | str) -> bytes:
    return base64.b64encode(data.encode() if isinstance(data, str) else data)


PLAIN_IR = b64(f"\0alice\0{PASSWORD}")
ALICE_PLAIN = AuthAttempt("PLAIN", "", "alice", PASSWORD)
ALICE_LOGIN = AuthAttempt("LOGIN", "", "alice", PASSWORD)


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


def no_password(client: Client) -> None:
    """The password shows up in no reply and in no event's text."""
    secret = PASSWORD.encode()
    assert secret not in client.greeting + client.replies
    for event in client.events:
        assert PASSWORD not in repr(event) and PASSWORD not in str(event)


# -- the offer ---------------------------------------------------------------------

def test_replies_on_the_wire():
    assert EHLO_AUTH == (b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 33554432\r\n"
                         b"250-AUTH PLAIN LOGIN\r\n250-8BITMIME\r\n"
                         b"250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n")
    assert R.AUTH_CONTINUE.wire == b"334 \r\n"
    assert R.AUTH_USERNAME.wire == b"334 VXNlcm5hbWU6\r\n"
    assert R.AUTH_PASSWORD.wire == b"334 UGFzc3dvcmQ6\r\n"
    assert R.AUTH_OK.wire == b"235 2.7.0 Authentication successful\r\n"
    assert R.AUTH_FAILED.wire == b"535 5.7.8 Authentication credentials invalid\r\n"
    assert R.AUTH_NEEDS_TLS.wire == (
        b"538 5.7.11 Encryption required for requested authentication mechanism\r\n")
    assert R.AUTH_REQUIRED.wire == b"530 5.7.0 Authentication required\r\n"
    assert R.AUTH_TEMPORARY_FAILURE.wire == b"454 4.7.0 Temporary authentication failure\r\n"
    assert R.AUTH_CANCELLED.wire.startswith(b"501 5.0.0 ")
    assert R.AUTH_BAD_BASE64.wire.startswith(b"501 5.5.2 ")
    assert R.AUTH_UNKNOWN_MECHANISM.wire.startswith(b"504 5.5.4 ")
    assert R.ALREADY_AUTHENTICATED.wire.startswith(b"503 5.5.1 ")
    assert R.AUTH_LINE_TOO_LONG.wire.startswith(b"500 5.5.6 ")


def test_not_offered_is_not_implemented(mode):
    client = Client(mode)
    assert client.send(EHLO + b"AUTH PLAIN " + PLAIN_IR + b"\r\n") == (
        EHLO_PLAIN + R.NOT_IMPLEMENTED.wire)
    assert not client.of(AuthAttempt)


def test_offered_only_under_tls_unless_plaintext_is_allowed(mode):
    client = Client(mode, starttls=True, auth_mechanisms=MECHS)
    assert client.send(EHLO + b"AUTH PLAIN " + PLAIN_IR + b"\r\n") == (
        EHLO_TLS + R.AUTH_NEEDS_TLS.wire)
    assert client.send(b"STARTTLS\r\n") == R.READY_FOR_TLS.wire
    client.conn.tls_started(TLS)
    assert client.send(EHLO + b"AUTH PLAIN " + PLAIN_IR + b"\r\n") == (
        EHLO_PLAIN.replace(b"250-8BITMIME", b"250-AUTH PLAIN LOGIN\r\n250-8BITMIME")
        + R.AUTH_OK.wire)
    assert client.of(AuthAttempt) == [ALICE_PLAIN]
    assert client.conn.authenticated_as == "alice"


def test_plaintext_offer(mode):
    client = Client(mode, **OPEN)
    assert client.send(EHLO) == EHLO_AUTH


def test_only_the_configured_mechanisms(mode):
    client = Client(mode, auth_mechanisms=("PLAIN",), auth_plaintext=True)
    assert b"250-AUTH PLAIN\r\n" in client.send(EHLO)
    assert client.send(b"AUTH LOGIN\r\n") == R.AUTH_UNKNOWN_MECHANISM.wire


def test_settings_are_checked():
    with pytest.raises(ValueError):
        Settings(auth_mechanisms=("CRAM-MD5",))
    with pytest.raises(ValueError):
        Settings(auth_required=True)
    Settings(auth_mechanisms=MECHS, max_command_bytes=65536, command_buffer_bytes=131072)


def test_response_limit_is_never_below_the_command_limit(mode):
    client = Client(mode, **OPEN, max_auth_line_bytes=100)
    long_ok = b64(f"\0alice\0{'p' * 300}")
    assert client.send(EHLO + b"AUTH PLAIN\r\n" + long_ok + b"\r\n").endswith(R.AUTH_OK.wire)


# -- the exchanges -----------------------------------------------------------------

EXCHANGES = [
    ("plain-initial", b"AUTH PLAIN " + PLAIN_IR + b"\r\n", [R.AUTH_OK], ALICE_PLAIN),
    ("plain-lower-case", b"auth plain " + PLAIN_IR + b"\r\n", [R.AUTH_OK], ALICE_PLAIN),
    ("plain-334", b"AUTH PLAIN\r\n" + PLAIN_IR + b"\r\n", [R.AUTH_CONTINUE, R.AUTH_OK],
     ALICE_PLAIN),
    ("plain-authzid", b"AUTH PLAIN " + b64(f"alice\0alice\0{PASSWORD}") + b"\r\n",
     [R.AUTH_OK], AuthAttempt("PLAIN", "alice", "alice", PASSWORD)),
    ("plain-utf8", b"AUTH PLAIN " + b64(f"\0j\u00f6rg\0{PASSWORD}") + b"\r\n",
     [R.AUTH_OK], AuthAttempt("PLAIN", "", "j\u00f6rg", PASSWORD)),
    ("login", b"AUTH LOGIN\r\n" + b64("alice") + b"\r\n" + b64(PASSWORD) + b"\r\n",
     [R.AUTH_USERNAME, R.AUTH_PASSWORD, R.AUTH_OK], ALICE_LOGIN),
    ("login-initial", b"AUTH LOGIN " + b64("alice") + b"\r\n" + b64(PASSWORD) + b"\r\n",
     [R.AUTH_PASSWORD, R.AUTH_OK], ALICE_LOGIN),
]


@pytest.mark.parametrize("data, expected, attempt",
                         [pytest.param(*case[1:], id=case[0]) for case in EXCHANGES])
def test_exchanges(mode, data, expected, attempt):
    client = Client(mode, **OPEN)
    assert client.send(EHLO + data + MAIL) == EHLO_AUTH + wire(*expected, R.SENDER_OK)
    assert client.of(AuthAttempt) == [attempt]
    assert client.conn.authenticated_as == attempt.username
    no_password(client)


REFUSALS = [
    ("before-ehlo", b"AUTH PLAIN " + PLAIN_IR + b"\r\n", R.NEED_HELO, False),
    ("after-helo", b"HELO c.example\r\nAUTH PLAIN " + PLAIN_IR + b"\r\n",
     R.AUTH_NEED_EHLO, True),
    ("in-transaction", EHLO + MAIL + b"AUTH PLAIN " + PLAIN_IR + b"\r\n",
     R.BAD_SEQUENCE, True),
    ("with-recipient", EHLO + MAIL + RCPT + b"AUTH PLAIN " + PLAIN_IR + b"\r\n",
     R.BAD_SEQUENCE, True),
    ("no-mechanism", EHLO + b"AUTH\r\n", R.AUTH_SYNTAX, True),
    ("extra-argument", EHLO + b"AUTH PLAIN a b\r\n", R.AUTH_SYNTAX, True),
    ("unknown-mechanism", EHLO + b"AUTH CRAM-MD5\r\n", R.AUTH_UNKNOWN_MECHANISM, True),
    # "ı" (dotless i) upper-cases to I in Python: not PLAIN, whatever str.upper() says.
    ("look-alike-mechanism", EHLO + "AUTH PLAıN ".encode() + PLAIN_IR + b"\r\n",
     R.AUTH_UNKNOWN_MECHANISM, True),
    ("cancel-plain", EHLO + b"AUTH PLAIN\r\n*\r\n", R.AUTH_CANCELLED, True),
    ("cancel-login-user", EHLO + b"AUTH LOGIN\r\n*\r\n", R.AUTH_CANCELLED, True),
    ("cancel-login-password", EHLO + b"AUTH LOGIN\r\n" + b64("alice") + b"\r\n*\r\n",
     R.AUTH_CANCELLED, True),
    ("cancel-initial", EHLO + b"AUTH PLAIN *\r\n", R.AUTH_CANCELLED, True),
    ("bad-base64", EHLO + b"AUTH PLAIN\r\n%%%\r\n", R.AUTH_BAD_BASE64, True),
    ("bad-base64-initial", EHLO + b"AUTH PLAIN abc\r\n", R.AUTH_BAD_BASE64, True),
    ("base64-with-space", EHLO + b"AUTH PLAIN\r\nYW Jj\r\n", R.AUTH_BAD_BASE64, True),
    ("bad-base64-login", EHLO + b"AUTH LOGIN\r\n\xff\xfe\r\n", R.AUTH_BAD_BASE64, True),
    ("empty-initial-plain", EHLO + b"AUTH PLAIN =\r\n", R.AUTH_BAD_RESPONSE, True),
    ("empty-response-plain", EHLO + b"AUTH PLAIN\r\n\r\n", R.AUTH_BAD_RESPONSE, True),
    ("plain-one-nul", EHLO + b"AUTH PLAIN " + b64("alice\0pw") + b"\r\n",
     R.AUTH_BAD_RESPONSE, True),
    ("plain-three-nuls", EHLO + b"AUTH PLAIN " + b64("\0alice\0pw\0x") + b"\r\n",
     R.AUTH_BAD_RESPONSE, True),
    ("plain-no-user", EHLO + b"AUTH PLAIN " + b64("\0\0pw") + b"\r\n", R.AUTH_BAD_RESPONSE, True),
    ("plain-no-password", EHLO + b"AUTH PLAIN " + b64("\0alice\0") + b"\r\n",
     R.AUTH_BAD_RESPONSE, True),
]


@pytest.mark.parametrize("data, refusal, greeted",
                         [pytest.param(*case[1:], id=case[0]) for case in REFUSALS])
def test_refusals(mode, data, refusal, greeted):
    """Each is refused with one reply, counted as an error, and the session goes on
    with commands (the line after the refusal is a command again)."""
    client = Client(mode, **OPEN)
    replies = client.send(data + b"NOOP\r\n")
    assert replies.endswith(refusal.wire + R.OK.wire)
    assert not client.of(AuthAttempt)
    assert client.conn.authenticated_as is None
    assert client.conn.errors == 1
    assert client.conn.state is not State.AUTH
    no_password(client)


def test_login_with_empty_initial_response_asks_for_the_password(mode):
    """"=" is a zero-length initial response (RFC 4954 4): an empty username, which the
    exchange refuses once the password came."""
    client = Client(mode, **OPEN)
    assert client.send(EHLO + b"AUTH LOGIN =\r\n") == EHLO_AUTH + R.AUTH_PASSWORD.wire
    assert client.send(b64(PASSWORD) + b"\r\n") == R.AUTH_BAD_RESPONSE.wire
    assert not client.of(AuthAttempt)


def test_already_authenticated(mode):
    client = Client(mode, **OPEN)
    client.send(EHLO + b"AUTH PLAIN " + PLAIN_IR + b"\r\n")
    assert client.send(b"AUTH LOGIN\r\n") == R.ALREADY_AUTHENTICATED.wire
    assert client.send(EHLO + b"AUTH PLAIN " + PLAIN_IR + b"\r\n") == (
        EHLO_AUTH + R.ALREADY_AUTHENTICATED.wire)  # a new EHLO does not forget it
    assert len(client.of(AuthAttempt)) == 1


# -- the decision ------------------------------------------------------------------

def test_a_rejected_attempt_counts_as_an_error_and_may_be_retried(mode):
    client = Client(mode, **OPEN, policy=reject(AuthAttempt, R.AUTH_FAILED))
    assert client.send(EHLO + b"AUTH PLAIN " + PLAIN_IR + b"\r\n" + MAIL) == (
        EHLO_AUTH + R.AUTH_FAILED.wire + R.SENDER_OK.wire)
    assert client.conn.authenticated_as is None
    assert client.conn.errors == 1
    assert client.send(b"RSET\r\nAUTH LOGIN\r\n") == R.OK.wire + R.AUTH_USERNAME.wire
    assert client.send(b64("bob") + b"\r\n" + b64("x") + b"\r\n") == (
        R.AUTH_PASSWORD.wire + R.AUTH_FAILED.wire)
    assert client.conn.errors == 2
    no_password(client)


def test_guessing_passwords_ends_in_421(mode):
    client = Client(mode, **OPEN, max_errors=3, policy=reject(AuthAttempt, R.AUTH_FAILED))
    client.send(EHLO + (b"AUTH PLAIN " + PLAIN_IR + b"\r\n") * 5)
    assert client.conn.closed
    assert client.replies == EHLO_AUTH + R.AUTH_FAILED.wire * 3 + R.TOO_MANY_ERRORS.wire
    assert len(client.of(AuthAttempt)) == 3


def test_a_stored_message_does_not_forgive_wrong_passwords(mode):
    """Other errors are forgiven by a stored message; wrong passwords are not, or a
    client could buy more guesses by sending a message between them."""
    client = Client(mode, **OPEN, max_errors=3, policy=reject(AuthAttempt, R.AUTH_FAILED))
    message = MAIL + RCPT + b"DATA\r\nbody\r\n.\r\n"
    attempt = b"AUTH PLAIN " + PLAIN_IR + b"\r\n"
    client.send(EHLO + b"XYZZY\r\n" + attempt + message)  # two errors, then a message
    assert not client.conn.closed and client.conn.errors == 2
    assert client.send(attempt) == R.AUTH_FAILED.wire  # the XYZZY was forgiven
    assert client.send(attempt) == R.AUTH_FAILED.wire + R.TOO_MANY_ERRORS.wire  # not these
    assert client.conn.closed and client.conn.errors == 4


def test_temporary_failure(mode):
    client = Client(mode, **OPEN, policy=reject(AuthAttempt, R.AUTH_TEMPORARY_FAILURE))
    assert client.send(EHLO + b"AUTH PLAIN " + PLAIN_IR + b"\r\n") == (
        EHLO_AUTH + R.AUTH_TEMPORARY_FAILURE.wire)
    assert client.conn.state is State.READY


@pytest.mark.parametrize("refusal", [R.AUTH_TEMPORARY_FAILURE,
                                     Reply(454, "4.7.0", "auth fault")])
def test_temporary_refusals_are_not_the_clients_errors(mode, refusal):
    """A full check queue or a fault rule's 454 is the server's trouble: five of them
    with max_errors 2 leave the session open, unlike wrong passwords."""
    client = Client(mode, **OPEN, max_errors=2, policy=reject(AuthAttempt, refusal))
    client.send(EHLO + (b"AUTH PLAIN " + PLAIN_IR + b"\r\n") * 5 + b"NOOP\r\n")
    assert client.replies == EHLO_AUTH + refusal.wire * 5 + R.OK.wire
    assert client.conn.errors == 0 and not client.conn.closed


def test_retrying_a_454_without_end_ends_in_421(mode):
    """A 454 is junk, not an error: free within max_junk_commands (EHLO is the first),
    then errors, then 421."""
    client = Client(mode, **OPEN, max_errors=2, max_junk_commands=2,
                    policy=reject(AuthAttempt, R.AUTH_TEMPORARY_FAILURE))
    client.send(EHLO + (b"AUTH PLAIN " + PLAIN_IR + b"\r\n") * 6)
    assert client.replies == EHLO_AUTH + R.AUTH_TEMPORARY_FAILURE.wire * 3 \
        + R.TOO_MANY_ERRORS.wire
    assert client.conn.closed


def test_pipelined_commands_wait_for_the_decision(mode):
    client = Client(mode, **OPEN, policy=hold(AuthAttempt))
    client.send(EHLO)
    assert client.send(b"AUTH PLAIN " + PLAIN_IR + b"\r\n" + MAIL) == b""
    assert client.conn.next_event() is PAUSED
    assert client.held == ALICE_PLAIN
    assert client.answer() == R.AUTH_OK.wire + R.SENDER_OK.wire


def test_accept_and_reject_by_hand():
    conn = SmtpServerConnection(Settings(**OPEN))
    conn.greet()
    conn.receive_data(EHLO + b"AUTH LOGIN\r\n" + b64("alice") + b"\r\n")
    assert conn.next_event() == HELLO
    conn.accept()
    assert conn.next_event() is NEED_DATA
    assert conn.state is State.AUTH
    conn.receive_data(b64(PASSWORD) + b"\r\n")
    event = conn.next_event()
    assert event == ALICE_LOGIN
    assert conn.next_event() is PAUSED
    conn.accept()
    assert conn.authenticated_as == "alice"
    assert conn.data_to_send().endswith(R.AUTH_PASSWORD.wire + R.AUTH_OK.wire)


# -- auth_required, MAIL AUTH=, the envelope ----------------------------------------

def test_auth_required(mode):
    client = Client(mode, **OPEN, auth_required=True)
    assert client.send(EHLO + MAIL + RCPT) == (
        EHLO_AUTH + R.AUTH_REQUIRED.wire + R.NEED_MAIL.wire)
    assert client.send(b"AUTH PLAIN " + PLAIN_IR + b"\r\n" + MAIL) == (
        R.AUTH_OK.wire + R.SENDER_OK.wire)
    assert client.of(MailFrom)


def test_auth_required_comes_after_require_tls(mode):
    client = Client(mode, starttls=True, require_tls=True, auth_mechanisms=MECHS,
                    auth_required=True)
    assert client.send(EHLO + MAIL) == EHLO_TLS + R.MUST_STARTTLS.wire


@pytest.mark.parametrize("param", [b"AUTH=<>", b"AUTH=alice@example.org",
                                   b"AUTH=e+3Dmc2@example.com", b"auth=<>"])
def test_mail_auth_parameter_is_accepted_and_ignored(mode, param):
    client = Client(mode, **OPEN)
    assert client.send(EHLO + b"MAIL FROM:<a@example.org> " + param + b"\r\n") == (
        EHLO_AUTH + R.SENDER_OK.wire)


@pytest.mark.parametrize("param", [b"AUTH", b"AUTH=", b"AUTH=a+zz", b"AUTH=a=b",
                                   b"AUTH=<> AUTH=<>"])
def test_mail_auth_parameter_must_be_xtext_once(mode, param):
    """Like a bad SIZE or BODY: a parameter we know, with a bad value (501 5.5.4)."""
    client = Client(mode, **OPEN)
    assert client.send(EHLO + b"MAIL FROM:<a@example.org> " + param + b"\r\n") == (
        EHLO_AUTH + R.BAD_PARAMETER_VALUE.wire)


def test_mail_auth_parameter_unknown_when_auth_is_not_offered(mode):
    client = Client(mode)
    assert client.send(EHLO + b"MAIL FROM:<a@example.org> AUTH=<>\r\n") == (
        EHLO_PLAIN + R.UNKNOWN_PARAMETER.wire)


def test_envelope_carries_the_user(mode):
    client = Client(mode, **OPEN)
    client.send(EHLO + b"AUTH PLAIN " + PLAIN_IR + b"\r\n" + MAIL + RCPT + b"DATA\r\n")
    assert client.of(DataStarted)[0].envelope == Envelope(
        "client.example", True, "alice@example.org", ("bob@mx.test",),
        authenticated_as="alice")
    client = Client(mode, **OPEN)
    client.send(EHLO + MAIL + RCPT + b"DATA\r\n")
    assert client.of(DataStarted)[0].envelope.authenticated_as is None


def test_starttls_forgets_authentication(mode):
    """RFC 3207 4.2: nothing learnt before TLS carries over, AUTH included."""
    client = Client(mode, starttls=True, **OPEN)
    assert client.send(EHLO + b"AUTH PLAIN " + PLAIN_IR + b"\r\nSTARTTLS\r\n") == (
        EHLO_TLS_AUTH + R.AUTH_OK.wire + R.READY_FOR_TLS.wire)
    client.conn.tls_started(TLS)
    assert client.conn.authenticated_as is None
    assert client.send(EHLO + b"AUTH PLAIN " + PLAIN_IR + b"\r\n").endswith(R.AUTH_OK.wire)
    assert len(client.of(AuthAttempt)) == 2


# -- limits --------------------------------------------------------------------------

def test_a_long_response_line_fits_the_larger_limit(mode):
    """A response may exceed the 512-octet command limit (RFC 4954 4): here 4,000
    octets of base64, longer than the whole command buffer."""
    password = "p" * 2990
    client = Client(mode, **OPEN, command_buffer_bytes=1200)
    response = b64(f"\0alice\0{password}")
    assert len(response) > 1200
    assert client.send(EHLO + b"AUTH PLAIN\r\n" + response + b"\r\n" + b"NOOP\r\n") == (
        EHLO_AUTH + R.AUTH_CONTINUE.wire + R.AUTH_OK.wire + R.OK.wire)
    assert client.of(AuthAttempt) == [AuthAttempt("PLAIN", "", "alice", password)]
    assert client.conn.buffer.capacity == 1200  # given back once commands resumed


def test_a_response_over_the_limit_ends_the_exchange(mode):
    client = Client(mode, **OPEN, max_auth_line_bytes=1000)
    over = b"A" * 1200 + b"\r\n"
    assert client.send(EHLO + b"AUTH PLAIN\r\n" + over + b"NOOP\r\n") == (
        EHLO_AUTH + R.AUTH_CONTINUE.wire + R.AUTH_LINE_TOO_LONG.wire + R.OK.wire)
    assert client.conn.errors == 1
    assert not client.of(AuthAttempt)


def test_a_long_initial_response_is_a_long_command(mode):
    client = Client(mode, **OPEN)
    line = b"AUTH PLAIN " + b"A" * 600 + b"\r\n"
    assert client.send(EHLO + line + b"NOOP\r\n") == (
        EHLO_AUTH + R.LINE_TOO_LONG.wire + R.OK.wire)


def test_bare_lf_response_under_reject(mode):
    client = Client(mode, **OPEN, bare_lf="reject")
    assert client.send(EHLO + b"AUTH PLAIN\r\n" + PLAIN_IR + b"\nNOOP\r\n") == (
        EHLO_AUTH + R.AUTH_CONTINUE.wire + R.BARE_LF_COMMAND.wire + R.OK.wire)


def test_bare_lf_response_under_normalize(mode):
    client = Client(mode, **OPEN)
    assert client.send(EHLO + b"AUTH PLAIN\r\n" + PLAIN_IR + b"\n").endswith(R.AUTH_OK.wire)


def test_many_cancelled_exchanges_end_in_421(mode):
    """A loop of AUTH and "*" costs an error each time: it cannot go on for ever."""
    client = Client(mode, **OPEN, max_errors=50)
    client.send(EHLO + b"AUTH PLAIN\r\n*\r\n" * 60)
    assert client.conn.closed
    assert isinstance(client.events[-1], ConnectionClosed)


# -- the password is never shown ---------------------------------------------------

def test_repr_hides_the_password():
    text = repr(ALICE_PLAIN)
    assert PASSWORD not in text and "<hidden>" in text and "alice" in text
    assert PASSWORD not in str(ALICE_PLAIN)
    assert not hasattr(ALICE_PLAIN, "__dict__")  # slotted


# -- any bytes --------------------------------------------------------------------

TOKENS = [b"AUTH ", b"PLAIN", b"LOGIN", b" ", b"=", b"*", b"\r\n", b"\n", b"\r", b"\x00",
          PLAIN_IR, b64("alice"), b"%%", b"\xff", b"A" * 40, b"MAIL FROM:<a@b.c> AUTH=<>",
          b"EHLO x", b"STARTTLS"]
sessions = st.one_of(st.lists(st.sampled_from(TOKENS), max_size=40).map(b"".join),
                     st.binary(max_size=200))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=sessions, sizes=st.lists(st.integers(1, 17), min_size=1, max_size=6),
       verdict=st.sampled_from([None, R.AUTH_FAILED, R.AUTH_TEMPORARY_FAILURE]))
@example(data=b"AUTH PLAIN\r\n" + PLAIN_IR + b"\r\n", sizes=[1], verdict=None)
@example(data=b"AUTH LOGIN\r\n\r\n\r\n", sizes=[3], verdict=R.AUTH_FAILED)
def test_any_bytes_after_auth_give_events_or_replies(data, sizes, verdict):
    policy = reject(AuthAttempt, verdict) if verdict else (lambda event: None)
    client = Client(settings=Settings(hostname="mx.test", starttls=True, max_errors=1000,
                                      max_auth_line_bytes=600, **OPEN), policy=policy)
    client.send(EHLO)
    client.send_sized(data, sizes)
    reply_lines(client.replies)  # every reply is a well-formed line
    for event in client.of(AuthAttempt):
        assert event.mechanism in MECHS and event.username
    assert PASSWORD.encode() not in client.replies
    for event in client.events:
        assert PASSWORD not in repr(event)


def test_an_authzid_of_another_user_is_handed_on_for_the_worker_to_refuse(mode):
    """No proxy authorization: the attempt goes to the worker like any other, which
    refuses it as a failed login (logins.py: delayed, counted, logged)."""
    client = Client(mode, **OPEN)
    client.send(EHLO + b"AUTH PLAIN " + b64(f"root\0alice\0{PASSWORD}") + b"\r\n")
    [attempt] = client.of(AuthAttempt)
    assert (attempt.authzid, attempt.username, attempt.acts_as_other) == ("root", "alice", True)
    assert client.conn.errors == 0  # not yet: the worker's 535 counts
