"""Listener profiles on a real server: etc/profiles.yaml, its three listeners each with
its own hostname, limits and fault rules, in one process; the log lines and /metrics
name the listener."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import yaml

from support.tlsserver import HOST, free_ports, metrics, wait_for_metric

EXAMPLE = Path(__file__).resolve().parents[2] / "etc" / "profiles.yaml"
BIG = b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n" + (b"y" * 78 + b"\r\n") * 1000  # 81 KiB


def start_example(make_server):
    """etc/profiles.yaml as shipped, but on free ports and with this test's Maildir."""
    document = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    *ports, stats = free_ports(len(document["server"]["listen"]) + 1)
    for entry, port in zip(document["server"]["listen"], ports):
        entry["address"] = f"{HOST}:{port}"
    document["stats"]["listen"] = f"{HOST}:{stats}"
    document["delivery"].pop("path")  # the fixture's own
    server = make_server(document)
    return server, dict(zip(("mx", "strict", "chaos"), ports))


def test_each_listener_applies_its_own_profile(make_server, raw_clients):
    server, port = start_example(make_server)

    # Each greets, answers EHLO and writes Received: with its own name.
    greetings = {}
    clients = {}
    for name in ("mx", "strict", "chaos"):
        client = clients[name] = raw_clients(port[name])
        greetings[name] = client.expect(220).text.split()[0]
        assert client.cmd("EHLO client.test", 250).lines[0].decode() \
            == f"250-{greetings[name]}"
    assert greetings == {"mx": "mx.example.org", "strict": "relay.example.org",
                         "chaos": "chaos.example.org"}

    # strict: 64K at most (552 after the body); mx: 50M, so the same message is stored.
    assert b"SIZE 65536" in clients["strict"].cmd("EHLO client.test", 250).raw
    assert clients["strict"].send_message(BIG).code == 552
    accepted = clients["mx"].send_message(BIG)
    assert accepted.code == 250
    [(_, stored)] = server.maildir_messages()
    assert f"by mx.example.org (minismtp) with ESMTP id {accepted.queue_id}".encode() in stored

    # chaos: its rule refuses the busy domain; strict has no rules, and stores it.
    chaos = clients["chaos"]
    chaos.cmd("MAIL FROM:<a@example.org>", 250)
    assert chaos.cmd("RCPT TO:<x@busy.test>", 450).raw == b"450 4.2.0 Mailbox busy\r\n"
    chaos.cmd("RSET", 250)
    assert clients["strict"].send_message(b"Subject: s\r\n\r\nhi\r\n",
                                          recipients=("x@busy.test",)).code == 250
    for client in clients.values():
        client.cmd("QUIT", 221)

    # The lines name the listener; the message lines too.
    server.wait_for_log(rf"id={accepted.queue_id} peer=127\.0\.0\.1 listener=mx from=<")
    server.wait_for_log(r"peer=127\.0\.0\.1 listener=strict from=<sender@example\.org> "
                        r"rcpts=1 size=\d+ result=rejected: message too big")
    for name, counts in (("mx", "mail=1 rcpt=1 data=1"), ("strict", "mail=2 rcpt=2 data=2"),
                         ("chaos", "mail=1 rcpt=1 rset=1")):
        server.wait_for_log(rf"disconnect from 127\.0\.0\.1:\d+ listener={name} ehlo=\d "
                            rf"{counts} quit=1 commands=\d+ end=quit")

    # /metrics: sessions and messages by listener; the fault counted as chaos's own.
    samples = wait_for_metric(server, 'minismtp_listener_sessions_total{listener="chaos"}', 1)
    samples = wait_for_metric(
        server, 'minismtp_listener_messages_accepted_total{listener="strict"}', 1)
    assert samples['minismtp_listener_messages_accepted_total{listener="mx"}'] == 1
    assert samples['minismtp_listener_messages_accepted_total{listener="chaos"}'] == 0
    assert samples['minismtp_listener_sessions_total{listener="mx"}'] == 1
    assert samples['minismtp_listener_sessions_total{listener="strict"}'] == 1
    assert samples['minismtp_faults_injected_total{listener="chaos",rule="busy"}'] == 1
    assert samples['minismtp_faults_injected_total{listener="chaos",rule="flaky"}'] == 0
    assert samples["minismtp_messages_accepted_total"] == 2
    assert not [key for key in metrics(server) if 'rule="' in key and "chaos" not in key]


def test_reload_applies_profiles_and_refuses_a_bad_one(make_server, raw_clients):
    a, b, stats = free_ports(3)

    def listen(hostname: str, recipients: object, b_name: str) -> list:
        return [{"address": f"{HOST}:{a}", "name": "a", "hostname": hostname,
                 "limits": {"max_recipients": recipients}},
                {"address": f"{HOST}:{b}", "name": b_name}]

    server = make_server({"server": {"workers": 1, "listen": listen("a.example", 2, "b")},
                          "stats": {"listen": f"{HOST}:{stats}"}})
    before = raw_clients(b)
    before.hello()
    before.cmd("QUIT", 221)

    server.reload({"server": {"listen": listen("a2.example", 1, "b2")}})
    client = raw_clients(a)
    assert client.hello().lines[0] == b"250-a2.example"
    client.cmd("MAIL FROM:<s@example.org>", 250)
    client.cmd("RCPT TO:<r1@example.org>", 250)
    client.cmd("RCPT TO:<r2@example.org>", 452)  # max_recipients 1 now
    client.cmd("QUIT", 221)
    raw_clients(b).hello()
    # The old generation's session stays counted under the name it had then.
    samples = wait_for_metric(server, 'minismtp_listener_sessions_total{listener="b2"}', 1)
    assert samples['minismtp_listener_sessions_total{listener="b"}'] == 1
    assert samples['minismtp_listener_sessions_total{listener="a"}'] == 1

    server.write_config({"server": {"listen": listen("a3.example", "ten", "b2")}})
    mark = server.mark()
    server.send_signal(signal.SIGHUP)
    server.wait_for_log(r'reload refused: server\.listen\[0\]\.limits\.max_recipients: must '
                        r'be an integer >= 1, got "ten"', since=mark)
    server.wait_for_log(r"reload refused: still running on the previous", since=mark)
    assert raw_clients(a).hello().lines[0] == b"250-a2.example"


def test_repeats_of_a_port0_address_keep_their_own_profiles(make_server, raw_clients):
    """Two entries of 127.0.0.1:0 share the name they are given by default, but each is a
    listener of its own: a socket, and its overrides."""
    server = make_server({"server": {"workers": 1, "listen": [
        f"{HOST}:0", {"address": f"{HOST}:0", "hostname": "second.example"}]}})
    ports = [int(port) for port in
             re.findall(rf"listening on {re.escape(HOST)}:(\d+)", server.log_text())]
    assert len(set(ports)) == 2, ports
    greetings = [raw_clients(port).expect(220).text.split()[0] for port in ports]
    assert greetings == [server.hostname, "second.example"]


def test_fault_counts_keep_their_labels_when_a_reload_reorders_rules(make_server, raw_clients):
    """A worker counts fault rules by index; a reload that puts another listener's rule
    first must not hand what the old worker counted to that rule."""
    a, b, stats = free_ports(3)
    busy = {"name": "busy", "stage": "rcpt", "reply": "450 4.2.0 Mailbox busy"}
    never = {"name": "never", "stage": "mail", "sender": "*@never.test",
             "reply": "451 4.3.2 Not now"}
    chaos = {"address": f"{HOST}:{a}", "name": "chaos", "faults": {"rules": [busy]}}
    server = make_server({"server": {"workers": 1, "listen": [chaos]},
                          "stats": {"listen": f"{HOST}:{stats}"}})
    client = raw_clients(a)
    client.hello()
    client.cmd("MAIL FROM:<s@example.org>", 250)
    client.cmd("RCPT TO:<r@example.org>", 450)
    client.cmd("QUIT", 221)
    wait_for_metric(server, 'minismtp_faults_injected_total{listener="chaos",rule="busy"}', 1)

    other = {"address": f"{HOST}:{b}", "name": "other", "faults": {"rules": [never]}}
    server.reload({"server": {"listen": [other, chaos]}})
    samples = metrics(server)
    assert samples['minismtp_faults_injected_total{listener="chaos",rule="busy"}'] == 1
    assert samples['minismtp_faults_injected_total{listener="other",rule="never"}'] == 0
