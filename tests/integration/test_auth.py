"""AUTH (RFC 4954) on a real server, as clients see it: smtplib and swaks logging in with
PLAIN and LOGIN over STARTTLS against an htpasswd file, wrong passwords answered late and
never logged, accept_any, AUTH refused before TLS, AUTH required before MAIL, the event
loop serving others while bcrypt checks run, one address's flood of checks not keeping
another client's out, a flood of guesses ending in 421, and the `auth` fault stage."""

from __future__ import annotations

import base64
import re
import smtplib
import subprocess
import threading
import time

import pytest

pytest.importorskip("bcrypt")
pytest.importorskip("trustme")

from minismtp.logins import FAILURE_DELAY_S  # noqa: E402
from minismtp.smtp import replies  # noqa: E402
from support.neighbours import missing, program  # noqa: E402
from support.tlsserver import (  # noqa: E402
    HOST, free_ports, start_tls, tls_overrides, wait_for_metric,
)
from support.users import users_file  # noqa: E402

USER, PASSWORD = "alice", "correct horse battery staple"
WRONG = "Wrong-Guess-4417"  # must appear nowhere in the server's log
SUCCESS = 'minismtp_auth_total{result="success"}'
FAILURE = 'minismtp_auth_total{result="failure"}'
BODY = b"Subject: authenticated\r\n\r\nhello\r\n"


@pytest.fixture
def start_auth(make_server, tls_files, tmp_path):
    """A one-worker server whose one listener has the given `auth` mapping."""

    def start(auth: dict | None = None, tls: str = "starttls", **sections: dict):
        if auth is None:
            auth = {"mode": "htpasswd", "users_file": str(users_file(tmp_path / "users", {USER: PASSWORD}))}
        listen = [{"address": f"{HOST}:0", "tls": tls, "auth": auth}]
        return make_server(tls_overrides(*tls_files, listen, **sections))

    return start


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def secure(client, pki):
    """EHLO, STARTTLS, handshake, EHLO again; the second EHLO reply."""
    client.hello()
    client.cmd("STARTTLS", 220)
    start_tls(client, pki.client_context())
    return client.cmd("EHLO client.test", 250)


# --- logging in ------------------------------------------------------------------------

@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_smtplib_login_over_starttls(start_auth, pki, mechanism):
    """smtplib's login() with one mechanism offered to it: 235, the message stored with
    "with ESMTPSA" (RFC 3848) in its Received header, user=alice on the message and
    session log lines, one success counted."""
    server = start_auth()
    with smtplib.SMTP(HOST, server.port, timeout=10) as smtp:
        smtp.starttls(context=pki.client_context())
        smtp.ehlo("client.test")
        assert set(smtp.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}
        smtp.esmtp_features["auth"] = mechanism  # login() picks from what was offered
        code, _ = smtp.login(USER, PASSWORD)
        assert code == 235
        assert smtp.sendmail("a@example.org", ["r@example.org"], BODY) == {}
    [(_, stored)] = server.maildir_messages()
    received = stored.split(b"\r\n\r\n", 1)[0]
    assert re.search(rb"with ESMTPSA id ", received), received
    server.wait_for_log(r"id=\S+ peer=127\.0\.0\.1 .* user=alice result=250")
    server.wait_for_log(r"disconnect from 127\.0\.0\.1:\d+ .*auth=1 .*user=alice end=quit")
    wait_for_metric(server, SUCCESS, 1)
    assert PASSWORD not in server.log_text()


def test_wrong_password_is_answered_late_and_never_logged(start_auth, pki, raw_clients):
    """535 5.7.8, not before FAILURE_DELAY_S; the session goes on, and the right password
    then succeeds. The failure is counted and logged with the user name only."""
    server = start_auth()
    client = raw_clients(server.port)
    secure(client, pki)
    began = time.monotonic()
    reply = client.cmd(f"AUTH PLAIN {plain(USER, WRONG)}", 535, "5.7.8")
    assert time.monotonic() - began >= FAILURE_DELAY_S * 0.9
    assert reply.raw == replies.AUTH_FAILED.wire
    # LOGIN, one step at a time, the right password this time.
    client.cmd("AUTH LOGIN", 334)
    client.cmd(base64.b64encode(USER.encode()), 334)
    client.cmd(base64.b64encode(PASSWORD.encode()), 235, "2.7.0")
    assert client.send_message(BODY).code == 250
    client.cmd("QUIT", 221)
    wait_for_metric(server, SUCCESS, 1)
    assert wait_for_metric(server, FAILURE, 1)[SUCCESS] == 1
    server.wait_for_log(r"auth: peer=127\.0\.0\.1 user=alice failed")
    server.wait_for_log(r"disconnect from .* user=alice end=quit")
    log = server.log_text()
    assert WRONG not in log and PASSWORD not in log
    assert plain(USER, WRONG) not in log


def test_accept_any_takes_every_password(start_auth, pki, raw_clients):
    server = start_auth({"mode": "accept_any"})
    for user, password in (("anyone", "x"), ("someone@example.org", WRONG)):
        with raw_clients(server.port) as client:
            secure(client, pki)
            client.cmd(f"AUTH PLAIN {plain(user, password)}", 235, "2.7.0")
            client.cmd("QUIT", 221)
    wait_for_metric(server, SUCCESS, 2)


def test_auth_before_tls_is_refused_and_mail_needs_auth(start_auth, pki, raw_clients):
    """Without allow_plaintext, AUTH before STARTTLS gets 538 5.7.11 (and EHLO does not
    list it); with require, MAIL before AUTH gets 530 5.7.0, and after it 250."""
    server = start_auth({"mode": "accept_any", "require": True})
    client = raw_clients(server.port)
    ehlo = client.hello()
    assert not any(line[4:].startswith(b"AUTH") for line in ehlo.lines)
    assert client.cmd(f"AUTH PLAIN {plain(USER, PASSWORD)}", 538, "5.7.11").raw \
        == replies.AUTH_NEEDS_TLS.wire
    client.cmd("STARTTLS", 220)
    start_tls(client, pki.client_context())
    ehlo = client.cmd("EHLO client.test", 250)
    assert b"AUTH PLAIN LOGIN" in [line[4:] for line in ehlo.lines]
    assert client.cmd("MAIL FROM:<a@example.org>", 530, "5.7.0").raw \
        == replies.AUTH_REQUIRED.wire
    client.cmd(f"AUTH PLAIN {plain(USER, PASSWORD)}", 235)
    client.cmd("MAIL FROM:<a@example.org>", 250)


@pytest.mark.parametrize("password, codes", [
    (PASSWORD, [235, 250, 250, 354]),
    (WRONG, [535, 530, 503, 503]),  # nothing after a failed AUTH is taken for granted
], ids=["right", "wrong"])
def test_auth_plain_pipelined_with_the_transaction(start_auth, pki, raw_clients, tmp_path,
                                                   password, codes):
    """RFC 4954 4: AUTH PLAIN with its initial response may lead a pipelined group. The
    commands behind it wait, unread, while the bcrypt check runs off the loop, and are
    answered in order after it: with the right password the transaction goes through and
    the message is stored as ESMTPSA; with a wrong one (answered late) MAIL gets 530 and
    RCPT and DATA 503, and nothing is stored."""
    users = users_file(tmp_path / "users", {USER: PASSWORD})
    server = start_auth({"mode": "htpasswd", "users_file": str(users), "require": True})
    client = raw_clients(server.port)
    secure(client, pki)
    client.send(f"AUTH PLAIN {plain(USER, password)}\r\n".encode()
                + client.envelope("a@example.org", ["r@example.org"]))
    assert [reply.code for reply in client.replies(4)] == codes
    if codes[-1] == 354:
        client.send(client.stuff(BODY))
        client.expect(250)
        [(_, stored)] = server.maildir_messages()
        assert b"with ESMTPSA id " in stored.split(b"\r\n\r\n", 1)[0]
        assert stored.endswith(BODY)
    client.cmd("QUIT", 221)
    if codes[-1] != 354:
        assert server.maildir_messages() == []


def test_users_file_is_read_again_on_hup(start_auth, pki, raw_clients, tmp_path):
    """A new password in the users file counts from the generation a HUP starts."""
    server = start_auth()  # its users file is tmp_path / "users"
    users_file(tmp_path / "users", {"alice": "a new password"})
    server.reload()
    with raw_clients(server.port) as client:
        secure(client, pki)
        client.cmd(f"AUTH PLAIN {plain(USER, PASSWORD)}", 535)
        client.cmd(f"AUTH PLAIN {plain(USER, 'a new password')}", 235)


# --- the loop goes on while passwords are checked ---------------------------------------

def test_other_sessions_are_served_while_checks_run(start_auth, tmp_path, raw_clients):
    """20 clients send AUTH at once (bcrypt at cost 11: tens of milliseconds each, two
    threads): a client of the same worker gets every NOOP answered within NOOP_BOUND_S
    all along, and all 20 succeed."""
    clients_n, noop_bound_s = 20, 0.5
    users = users_file(tmp_path / "slow-users", {USER: PASSWORD}, rounds=11)
    server = start_auth({"mode": "htpasswd", "users_file": str(users),
                         "allow_plaintext": True}, tls="none",
                        limits={"max_junk_commands": 100_000})
    clients = [raw_clients(server.port, timeout=60) for _ in range(clients_n)]
    for client in clients:
        client.hello()
    watcher = raw_clients(server.port)
    watcher.hello()
    results: list[int] = []
    done = threading.Event()

    def collect() -> None:
        try:
            results.extend(client.reply().code for client in clients)
        finally:
            done.set()

    for client in clients:
        client.send(f"AUTH PLAIN {plain(USER, PASSWORD)}\r\n".encode())
    reader = threading.Thread(target=collect)
    reader.start()
    waits = []
    deadline = time.monotonic() + 60
    while not done.is_set() and time.monotonic() < deadline:
        began = time.monotonic()
        watcher.cmd("NOOP", 250)
        waits.append(time.monotonic() - began)
        time.sleep(0.01)
    reader.join(timeout=60)
    assert results == [235] * clients_n
    assert waits, "the checks ended before the first NOOP"
    assert max(waits) < noop_bound_s, sorted(waits)[-5:]
    wait_for_metric(server, SUCCESS, clients_n)


def test_one_address_cannot_keep_anothers_check_out(start_auth, tmp_path, raw_clients):
    """80 connections from 127.0.0.1 send AUTH at once, more than the worker's checker
    holds (2 running, 64 waiting), and send it again at each 454 4.7.0, keeping the
    queue full. A client from 127.0.0.2 still gets its check, in place of the flood's
    newest (which gets 454), and in turn with the flood's: 235 while the flood goes on."""
    flood_n = 80
    users = users_file(tmp_path / "slow-users", {USER: PASSWORD}, rounds=11)
    server = start_auth({"mode": "htpasswd", "users_file": str(users),
                         "allow_plaintext": True}, tls="none",
                        limits={"max_junk_commands": 100_000, "max_errors": 100_000})
    flood = [raw_clients(server.port, timeout=60) for _ in range(flood_n)]
    for client in flood:
        client.hello()
    refused = threading.Semaphore(0)
    stop = threading.Event()
    codes: list[int] = []

    def attack(client) -> None:
        while not stop.is_set():
            client.send(f"AUTH PLAIN {plain(USER, PASSWORD)}\r\n".encode())
            code = client.reply().code
            codes.append(code)
            if code != 454:
                return
            refused.release()

    attackers = [threading.Thread(target=attack, args=(client,)) for client in flood]
    for thread in attackers:
        thread.start()
    try:
        for _ in range(2 * (flood_n - 66)):  # the queue is full, and kept full
            assert refused.acquire(timeout=30)
        other = raw_clients(server.port, source="127.0.0.2", timeout=60)
        other.hello()
        other.cmd(f"AUTH PLAIN {plain(USER, PASSWORD)}", 235)
        assert codes.count(235) < flood_n  # the flood is still being checked
        server.wait_for_log(r"auth: peer=127\.0\.0\.1 temporary failure: too many "
                            r"checks waiting, most of them this client's")
    finally:
        stop.set()  # each attacker ends at its next answer
        for thread in attackers:
            thread.join(timeout=60)
    assert set(codes) == {235, 454}, codes
    assert codes.count(235) >= 66 - 1  # every check taken ran, but the one shed


def test_a_flood_of_guesses_ends_in_421(start_auth, pki, raw_clients):
    """Ten wrong AUTH commands in one write: one answer at a time, each a second late,
    and the error budget (max_errors: 3) ends the session with 421."""
    server = start_auth(limits={"max_errors": 3})
    client = raw_clients(server.port)
    secure(client, pki)
    began = time.monotonic()
    client.send(f"AUTH PLAIN {plain(USER, WRONG)}\r\n".encode() * 10)
    codes = []
    while not codes or codes[-1] != 421:
        codes.append(client.reply().code)
        assert len(codes) <= 4, codes
    assert codes == [535, 535, 535, 421] or codes == [535, 535, 421], codes
    assert time.monotonic() - began >= 2 * FAILURE_DELAY_S * 0.9
    client.wait_closed()
    wait_for_metric(server, FAILURE, codes.count(535))
    assert WRONG not in server.log_text()


def test_a_tarpit_at_auth_slows_the_answer_of_a_check_made_off_the_loop(
        start_auth, tmp_path, raw_clients):
    """NOOP, AUTH and NOOP in one segment, an `auth` rule tarpitting at 10 bytes/s, the
    password checked on a thread: the first NOOP's 250 comes at once, the 235 that comes
    after the check is the reply trickled, and the second NOOP's 250 comes right after
    it, at full speed."""
    server = start_auth({"mode": "htpasswd",
                         "users_file": str(users_file(tmp_path / "users", {USER: PASSWORD})),
                         "allow_plaintext": True}, tls="none",
                        faults={"rules": [{"name": "slow-auth", "stage": "auth",
                                           "tarpit": 10}]})
    client = raw_clients(server.port, timeout=30)
    client.hello()
    began = time.monotonic()
    client.send(f"NOOP\r\nAUTH PLAIN {plain(USER, PASSWORD)}\r\nNOOP\r\n".encode())
    assert client.reply().code == 250
    assert time.monotonic() - began < 0.5
    assert client.reply(timeout=30).raw == replies.AUTH_OK.wire
    authenticated = time.monotonic()
    assert authenticated - began >= 0.5 * len(replies.AUTH_OK.wire) / 10
    assert client.reply(timeout=30).code == 250
    assert time.monotonic() - authenticated < 0.3


def test_auth_fault_stage(start_auth, pki, raw_clients):
    """A rule at stage `auth` answers 454 before any password check; the session
    goes on."""
    server = start_auth(faults={"rules": [{"name": "no-auth", "stage": "auth",
                                           "reply": "454 4.7.0 Try again later"}]})
    client = raw_clients(server.port)
    secure(client, pki)
    reply = client.cmd(f"AUTH PLAIN {plain(USER, PASSWORD)}", 454, "4.7.0")
    assert reply.text == "4.7.0 Try again later"
    client.cmd("NOOP", 250)
    client.cmd("QUIT", 221)
    samples = wait_for_metric(server, 'minismtp_faults_injected_total{rule="no-auth"}', 1)
    # Refused before any check: a rejection by code, not an auth result (README).
    assert samples.get('minismtp_rejections_total{code="454"}') == 1
    assert all(samples.get(f'minismtp_auth_total{{result="{result}"}}', 0) == 0
               for result in ("success", "failure", "temporary")), samples


def test_a_listeners_own_auth_rule_fires_there_only(make_server, raw_clients):
    """Where no rule watches AUTH, an attempt goes straight to the check; a listener
    whose own fault rules watch it refuses there, and only there."""
    chaos, calm, stats = free_ports(3)
    auth = {"mode": "accept_any", "allow_plaintext": True}
    rule = {"name": "no-auth", "stage": "auth", "reply": "454 4.7.0 Try again later"}
    server = make_server({"stats": {"listen": f"{HOST}:{stats}"}, "server": {
        "workers": 1, "listen": [
            {"address": f"{HOST}:{chaos}", "name": "chaos", "auth": auth,
             "faults": {"rules": [rule]}},
            {"address": f"{HOST}:{calm}", "name": "calm", "auth": auth}]}})
    for port, code in [(chaos, 454), (calm, 235), (chaos, 454)]:
        client = raw_clients(port)
        client.hello()
        client.cmd(f"AUTH PLAIN {plain(USER, PASSWORD)}", code)
        client.cmd("QUIT", 221)
    samples = wait_for_metric(
        server, 'minismtp_faults_injected_total{listener="chaos",rule="no-auth"}', 2)
    assert samples[SUCCESS] == 1


# --- swaks ------------------------------------------------------------------------------

@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_auth_over_tls(start_auth, tmp_path, mechanism):
    swaks = program("swaks")
    server = start_auth()
    data = tmp_path / "message.eml"
    data.write_bytes(BODY[:-2])  # swaks ends the last line itself
    result = subprocess.run(
        [swaks, "--server", HOST, "--port", str(server.port), "--helo", "client.test",
         "--from", "a@example.org", "--to", "r@example.org", "--data", f"@{data}",
         "--tls", "--auth", mechanism, "--auth-user", USER, "--auth-password", PASSWORD,
         "--timeout", "60"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
        timeout=120)
    if "TLS not available" in result.stderr:
        missing("swaks has no TLS: install libnet-ssleay-perl (.ci/install-neighbours does)")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
    # After STARTTLS swaks marks the lines it sends and reads with "~>" and "<~".
    assert "<~  235 2.7.0" in result.stdout
    [queue_id] = re.findall(r"^<~  250 2\.0\.0 Ok: queued as (\S+)$", result.stdout, re.M)
    [(_, stored)] = server.maildir_messages()
    assert b"with ESMTPSA id " + queue_id.encode() in stored
    assert stored.endswith(BODY)
    server.wait_for_log(rf"id={queue_id} .* user=alice result=250")
