"""Fault rules and live statistics against a real server: what a client sees, what is counted."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

from minismtp.delivery.untrusted import mailbox_parts
from minismtp.smtp import replies

HOST = "127.0.0.1"
STATS_WAIT_S = 5.0  # workers publish about once a second
BODY = b"Subject: faults\r\n\r\nhello\r\n"
BUSY = "450 4.2.0 Mailbox busy"
MAYBE = "451 4.7.1 Try again later"
REFUSED = "554 5.7.1 Message refused"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def http_get(port: int, path: str) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


def stats_doc(port: int) -> dict:
    status, content_type, body = http_get(port, "/stats")
    assert (status, content_type) == (200, "application/json")
    return json.loads(body)


# --- a strict reader of the Prometheus text format (0.0.4) --------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"({_NAME})(?:\{{(.*)\}})? (\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
_VALUE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|Inf)|NaN")


@dataclass
class Family:
    help: str
    kind: str = ""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)

    def get(self, suffix: str = "", **labels: str) -> float:
        return self.samples[(suffix, tuple(sorted(labels.items())))]


def parse_prometheus(text: str) -> dict[str, Family]:
    """Families by name; fails on anything outside HELP, TYPE and `name{labels} value`."""
    assert text.endswith("\n") and "\n\n" not in text, "lines end with one LF"
    families: dict[str, Family] = {}
    current: tuple[str, Family] | None = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, doc = line[len("# HELP "):].partition(" ")
            assert re.fullmatch(_NAME, name) and doc and name not in families, line
            current = name, families.setdefault(name, Family(doc))
            continue
        if line.startswith("# TYPE "):
            name, kind = line[len("# TYPE "):].split(" ")
            assert current and current[0] == name and not current[1].kind, line
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            current[1].kind = kind
            continue
        m = _SAMPLE.fullmatch(line)
        assert m and current and current[1].kind, f"not a sample of a typed family: {line!r}"
        (name, label_text, value), (family_name, family) = m.groups(), current
        suffixes = ("_bucket", "_sum", "_count") if family.kind == "histogram" else ("",)
        suffix = next((s for s in suffixes if name == family_name + s), None)
        assert suffix is not None, f"{name} outside its family {family_name}"
        labels = _LABEL.findall(label_text or "")
        rebuilt = ",".join(f'{k}="{v}"' for k, v in labels)
        assert rebuilt == (label_text or "") and len(dict(labels)) == len(labels), line
        assert _VALUE.fullmatch(value), line
        key = (suffix, tuple(sorted(labels)))
        assert key not in family.samples, f"duplicate sample {line!r}"
        family.samples[key] = float(value)
    for name, family in families.items():
        assert family.kind, f"{name} has no TYPE"
        if family.kind == "counter":
            assert all(v >= 0 for v in family.samples.values()), name
        if family.kind == "histogram":
            buckets = [(float(dict(labels)["le"]), v)
                       for (suffix, labels), v in family.samples.items() if suffix == "_bucket"]
            bounds, counts = [b for b, _ in buckets], [v for _, v in buckets]
            assert bounds == sorted(set(bounds)) and bounds[-1:] == [float("inf")], bounds
            assert counts == sorted(counts), f"{name} buckets are not cumulative: {counts}"
            assert counts[-1] == family.get("_count") and family.get("_sum") >= 0, name
    return families


# --- traffic whose every counter the test knows -----------------------------------------

STATS_RULES = [
    {"name": "busy", "stage": "rcpt", "recipient": "*@busy.test", "reply": BUSY},
    {"name": "maybe", "stage": "rcpt", "recipient": "*@maybe.test", "rate": 0.5,
     "reply": MAYBE},
    {"name": "refuse-body", "stage": "end_of_data", "recipient": "*@refuse.test",
     "reply": REFUSED},
    {"name": "slow-helo", "stage": "helo", "delay": 0.01},
    {"name": "never", "stage": "mail", "sender": "*@nowhere.test", "reply": "550 5.7.1 No"},
]


@dataclass
class Tally:
    """What the client sent and saw, in the server's counter terms."""

    connections: int = 0
    transactions: int = 0
    accepted: int = 0
    end_of_data: int = 0
    sent: int = 0
    rejections: Counter = field(default_factory=Counter)
    faults: Counter = field(default_factory=Counter)

    def send(self, client, data: bytes) -> None:
        client.send(data)
        self.sent += len(data)

    def see(self, reply) -> int:
        if reply.code >= 400:
            self.rejections[reply.code] += 1
        rule = {BUSY: "busy", MAYBE: "maybe", REFUSED: "refuse-body"}.get(reply.lines[-1].decode())
        if rule:
            self.faults[rule] += 1
        return reply.code

    def transaction(self, client, recipients: list[str], end_code: int) -> None:
        self.send(client, client.envelope("s@example.org", recipients))
        codes = [self.see(r) for r in client.replies(len(recipients) + 2)]
        assert codes[0] == 250 and codes[-1] == 354 and 250 in codes[1:-1], codes
        self.transactions += 1
        self.send(client, client.stuff(BODY))
        assert self.see(client.reply()) == end_code
        self.end_of_data += 1
        self.accepted += end_code == 250

    def expected(self) -> dict:
        names = [rule["name"] for rule in STATS_RULES]
        return {"connections": self.connections, "transactions": self.transactions,
                "messages_accepted": self.accepted, "end_of_data": self.end_of_data,
                "rejections": {str(c): n for c, n in sorted(self.rejections.items())},
                "faults": {name: self.faults[name] for name in names}}


def run_traffic(port: int, raw_clients, tally: Tally, connections: int = 4) -> None:
    busy, maybe = tally.faults["busy"], tally.faults["maybe"]
    clients = [raw_clients(port) for _ in range(connections)]  # open at once: both workers
    for client in clients:
        client.expect(220)
        tally.send(client, b"EHLO client.test\r\n")
        client.expect(250)
        tally.connections += 1
        tally.faults["slow-helo"] += 1
    for client in clients:
        tally.transaction(client, ["ok@example.org"], 250)
        tally.transaction(client, ["x@busy.test", "ok@example.org",
                                   *(f"m{i}@maybe.test" for i in range(5))], 250)
        tally.transaction(client, ["r@refuse.test"], 554)
        tally.send(client, b"RCPT TO:<z@example.org>\r\n")  # a refusal by the core: 503
        assert tally.see(client.reply()) == 503
        tally.send(client, b"QUIT\r\n")
        client.expect(221)
        client.close()
    assert tally.faults["busy"] - busy == connections
    assert 0 < tally.faults["maybe"] - maybe < 5 * connections  # rate 0.5 over 5 each


def counted(doc: dict) -> dict:
    return {"connections": doc["connections"]["total"], "transactions": doc["transactions"],
            "messages_accepted": doc["messages_accepted"],
            "end_of_data": doc["end_of_data_seconds"]["count"],
            "rejections": doc["rejections"], "faults": doc["faults"]}


def wait_for_counts(server, port: int, tally: Tally) -> dict:
    def complete() -> dict | None:
        doc = stats_doc(port)
        ok = counted(doc) == tally.expected() and doc["bytes_received"] >= tally.sent
        return doc if ok and doc["connections"]["open"] == 0 else None

    try:
        return server.wait_until(complete, STATS_WAIT_S, 0.1, "the counters")  # type: ignore
    except AssertionError:
        assert counted(stats_doc(port)) == tally.expected()  # shows the difference
        raise


def stats_server(make_server, workers: int = 2):
    port = free_port()
    server = make_server({"server": {"workers": workers}, "delivery": {"backend": "discard"},
                          "stats": {"listen": f"{HOST}:{port}"},
                          "faults": {"seed": 3, "rules": STATS_RULES}})
    return server, port


# --- fault rules ------------------------------------------------------------------------

def test_seeded_rate_rejects_its_share_and_replays_exactly(make_server, raw_clients):
    def run(seed: int, batch: int = 200) -> list[int]:
        """One MAIL, then 2,000 RCPTs pipelined in batches: the accept/reject sequence."""
        server = make_server({"server": {"workers": 1}, "limits": {"max_recipients": 2000},
                              "faults": {"seed": seed, "rules": [
                                  {"name": "busy", "stage": "rcpt", "rate": 0.3,
                                   "reply": BUSY}]}})
        client = raw_clients(server.port)
        client.hello()
        client.cmd("MAIL FROM:<load@example.org>", 250)
        codes: list[int] = []
        for start in range(0, 2000, batch):
            client.send(b"".join(b"RCPT TO:<r%d@example.org>\r\n" % i
                                 for i in range(start, start + batch)))
            for reply in client.replies(batch):
                assert reply.raw in (replies.RECIPIENT_OK.wire, BUSY.encode() + b"\r\n"), reply
                codes.append(reply.code)
        client.cmd("RSET", 250)
        client.cmd("QUIT", 221)
        client.close()
        assert server.stop() == 0
        return codes

    first = run(7)
    assert len(first) == 2000
    assert 0.25 <= first.count(450) / 2000 <= 0.35, first.count(450)
    assert run(7) == first  # a second server with the same seed: the same sequence
    assert run(8) != first  # and the seed is what decides it


def test_a_seeded_sequence_starts_again_after_a_reload_and_a_respawn(make_server,
                                                                     raw_clients):
    """One worker, seed 5: after a reload with the file unchanged (a new generation,
    its worker in another board slot while the old one still holds its own), and after
    that worker is killed and replaced, 200 pipelined RCPTs are decided as on a fresh
    start: a worker's sequence is its place in its generation's, from the beginning."""
    server = make_server({"server": {"workers": 1}, "delivery": {"backend": "discard"},
                          "faults": {"seed": 5, "rules": [{"name": "busy", "stage": "rcpt",
                                                           "rate": 0.3, "reply": BUSY}]}})

    def decided() -> list[int]:
        client = raw_clients(server.port)
        client.hello()
        client.cmd("MAIL FROM:<s@example.org>", 250)
        client.send(b"".join(b"RCPT TO:<r%d@example.org>\r\n" % i for i in range(200)))
        codes = [reply.code for reply in client.replies(200)]
        client.cmd("QUIT", 221)
        client.close()
        return codes

    fresh = decided()
    assert 30 <= fresh.count(450) <= 90, fresh
    server.reload()
    assert decided() == fresh
    (pid,) = server.worker_pids()
    os.kill(pid, signal.SIGKILL)
    server.wait_until(lambda: pid not in server.worker_pids() and server.worker_pids(),
                      10.0, 0.05, "a new worker")
    assert decided() == fresh


def test_recipient_glob_rejects_exactly_the_matching_recipients(make_server, raw_clients):
    # One mailbox per recipient: the message is stored exactly in the accepted ones (a
    # file for several recipients names none of them, so its headers cannot tell).
    server = make_server({"server": {"workers": 1}, "delivery": {"layout": "per_recipient"},
                          "faults": {"rules": [
                              {"name": "reject-domain", "stage": "rcpt",
                               "recipient": "*@reject.test",
                               "reply": "550 5.1.1 Mailbox unavailable"}]}})
    recipients = {"a@reject.test": 550, "b@accept.test": 250, "C@REJECT.TEST": 550,
                  "d@sub.reject.test": 250, "e@reject.test.org": 250,
                  "reject.test@f.test": 250, "g@notreject.test": 250, "h@reject.test": 550}
    client = raw_clients(server.port)
    client.hello()
    client.send(client.envelope("s@example.org", list(recipients)))
    assert client.expect(250).raw == replies.SENDER_OK.wire
    got = {rcpt: client.reply() for rcpt in recipients}
    assert {rcpt: r.code for rcpt, r in got.items()} == recipients
    assert {r.raw for r in got.values() if r.code == 550} == {
        b"550 5.1.1 Mailbox unavailable\r\n"}
    client.expect(354)
    client.send(client.stuff(BODY))
    client.expect(250)
    client.cmd("QUIT", 221)
    stored_in = sorted(str(path.parent.parent.relative_to(server.mail_dir))
                       for path in server.mail_dir.glob("*/*/new/*"))
    assert stored_in == sorted("/".join(mailbox_parts(r)) for r, c in recipients.items()
                               if c == 250)


def test_delay_at_end_of_data_does_not_hold_up_other_connections(make_server, raw_clients):
    server = make_server({"server": {"workers": 1}, "delivery": {"backend": "discard"},
                          "faults": {"rules": [{"name": "slow-end", "stage": "end_of_data",
                                                "recipient": "*@slow.test", "delay": 0.5}]}})
    slow, fast = raw_clients(server.port), raw_clients(server.port)
    slow.hello()
    fast.hello()
    slow.send(slow.envelope("s@example.org", ["x@slow.test"]))
    assert [r.code for r in slow.replies(3)] == [250, 250, 354]
    started = time.monotonic()
    slow.send(slow.stuff(BODY))
    time.sleep(0.05)  # the worker has the terminator and is now waiting on the rule
    fast_start = time.monotonic()
    assert fast.send_message(BODY, recipients=("y@fast.test",)).code == 250
    fast_s = time.monotonic() - fast_start
    assert slow.quiet_for(0), "the delayed reply came before the fast transaction ended"
    assert slow.expect(250, "2.0.0", timeout=5)
    slow_s = time.monotonic() - started
    assert fast_s < 0.25, f"a parallel transaction took {fast_s:.3f}s"
    assert slow_s >= 0.5, f"the delayed reply came after {slow_s:.3f}s"
    for client in (slow, fast):
        client.cmd("QUIT", 221)


# The client's steps in order, with the normal reply; a rule at STAGES[i] fires at step i.
STAGES = ["connect", "helo", "mail", "rcpt", "data", "end_of_data", "quit"]
STEPS = [(None, 220), (b"EHLO client.test\r\n", 250), (b"MAIL FROM:<s@example.org>\r\n", 250),
         (b"RCPT TO:<r@example.org>\r\n", 250), (b"DATA\r\n", 354),
         (BODY + b".\r\n", 250), (b"QUIT\r\n", 221)]


@pytest.mark.parametrize("stage", STAGES)
def test_disconnect_drops_at_its_stage_without_a_reply(make_server, raw_clients, stage):
    server = make_server({"server": {"workers": 1}, "faults": {"rules": [
        {"name": "drop", "stage": stage, "disconnect": True}]}})
    workers = server.worker_pids()
    client = raw_clients(server.port)
    at = STAGES.index(stage)
    for line, code in STEPS[:at]:
        if line is not None:
            client.send(line)
        client.expect(code)
    if STEPS[at][0] is not None:
        client.send(STEPS[at][0])
    assert client.wait_closed() == b"", "no reply before the drop"
    if stage == "end_of_data":
        assert server.files("new") == [] and server.files("tmp") == []
    assert server.worker_pids() == workers  # a dropped session, not a dead worker


@pytest.mark.parametrize("fsync", [False, True])  # answered at once, or after a commit
@pytest.mark.parametrize(("stage", "after_dot"), [
    ("quit", b"QUIT\r\n"), ("mail", b"MAIL FROM:<next@example.org>\r\n")])
def test_disconnect_after_a_pipelined_dot_keeps_the_messages_250(
        make_server, raw_clients, fsync, stage, after_dot):
    """The final dot and the next command in one segment (RFC 2920), the rule dropping
    the connection at that command: the message is stored, so its 250 goes out before
    the drop (else the client would send it again); the dropped command gets nothing."""
    rule = {"name": "drop", "stage": stage, "disconnect": True}
    if stage == "mail":
        rule["sender"] = "next@*"
    server, client = _whole_message_sent(make_server, raw_clients, rule, fsync=fsync,
                                         after=after_dot)
    seen = client.wait_closed()
    assert seen.startswith(b"250 2.0.0 Ok: queued as ") and seen.count(b"\r\n") == 1, seen
    assert len(server.files("new")) == 1


def test_reply_rule_at_connect_leaves_only_quit(make_server, raw_clients):
    server = make_server({"server": {"workers": 1}, "faults": {"rules": [
        {"name": "no-service", "stage": "connect", "reply": "554 5.7.1 No service"}]}})
    client = raw_clients(server.port)
    assert client.reply().raw == b"554 5.7.1 No service\r\n"
    for line in ("EHLO client.test", "HELO client.test", "MAIL FROM:<s@example.org>",
                 "RCPT TO:<r@example.org>", "DATA", "RSET", "NOOP"):
        assert client.cmd(line, 503).raw == replies.NO_SERVICE_SEQUENCE.wire, line
    assert client.cmd("QUIT", 221).raw == replies.CLOSING.wire
    assert client.wait_closed() == b""


def test_tarpit_at_helo_trickles_the_reply_then_the_session_works(make_server, raw_clients):
    # The idle timeout is shorter than the tarpitted reply: our own slowness must not
    # count as the client's idleness and cut the reply short.
    server = make_server({"server": {"workers": 1}, "delivery": {"backend": "discard"},
                          "limits": {"command_timeout": "2s"},
                          "faults": {"rules": [{"name": "slow-ehlo", "stage": "helo",
                                                "tarpit": 20}]}})
    client = raw_clients(server.port)
    client.expect(220, timeout=1)  # the greeting is not slowed
    started = time.monotonic()
    client.send(b"EHLO client.test\r\n")
    reply = client.expect(250, timeout=30)
    elapsed = time.monotonic() - started
    expected = len(reply.raw) / 20
    assert len(reply.lines) > 3
    assert 0.5 * expected <= elapsed <= 2 * expected + 1, (elapsed, expected)
    started = time.monotonic()
    assert client.send_message(BODY).code == 250
    client.cmd("QUIT", 221)
    assert time.monotonic() - started < 1, "only the one reply is tarpitted"


def arrivals(sock: socket.socket, until: bytes, limit_s: float = 30.0
             ) -> list[tuple[float, bytes]]:
    """(seconds since the call, bytes) of each read, until `until` has come."""
    got, pieces, began = b"", [], time.monotonic()
    sock.settimeout(0.5)
    while until not in got and time.monotonic() - began < limit_s:
        try:
            piece = sock.recv(4096)
        except TimeoutError:
            continue
        if not piece:
            break
        got += piece
        pieces.append((time.monotonic() - began, piece))
    assert until in got, pieces
    return pieces


@pytest.mark.parametrize("delay", [0, 0.2])
def test_tarpit_slows_only_the_reply_its_rule_fired_for(make_server, raw_clients, delay):
    """MAIL and RCPT in one segment, a rule tarpitting RCPT's reply (after a delay, or
    at once): MAIL's 250 comes whole at once; RCPT's 250 takes about its length / 10 s,
    in pieces."""
    rule = {"name": "slow-rcpt", "stage": "rcpt", "tarpit": 10}
    if delay:
        rule["delay"] = delay
    server = make_server({"server": {"workers": 1}, "delivery": {"backend": "discard"},
                          "faults": {"rules": [rule]}})
    client = raw_clients(server.port)
    client.hello()
    client.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<r@example.org>\r\n")
    pieces = arrivals(client.sock, replies.RECIPIENT_OK.wire)
    first_at, first = pieces[0]
    assert first.startswith(replies.SENDER_OK.wire) and first_at < 0.5 + delay, pieces
    rcpt_pieces = b"".join(piece for _, piece in pieces)[len(replies.SENDER_OK.wire):]
    assert rcpt_pieces == replies.RECIPIENT_OK.wire
    assert len(pieces) >= 4 and pieces[-1][0] >= delay + 0.5 * len(rcpt_pieces) / 10, pieces


def test_two_pipelined_tarpitted_replies_are_both_slow(make_server, raw_clients):
    """MAIL and two RCPTs in one segment, the rule firing for each RCPT: MAIL's 250 comes
    at once, and both RCPT replies (28 bytes at 10 bytes/s) are trickled, the first one
    included."""
    server = make_server({"server": {"workers": 1}, "delivery": {"backend": "discard"},
                          "faults": {"rules": [{"name": "slow-rcpt", "stage": "rcpt",
                                                "tarpit": 10}]}})
    client = raw_clients(server.port)
    client.hello()
    client.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<a@example.org>\r\n"
                b"RCPT TO:<b@example.org>\r\n")
    pieces = arrivals(client.sock, replies.RECIPIENT_OK.wire * 2)
    # At full speed, alone: a busy machine may let a trickled byte or two join it.
    first = pieces[0][1]
    assert first.startswith(replies.SENDER_OK.wire), pieces
    assert len(first) - len(replies.SENDER_OK.wire) <= 3, pieces
    received, first_rcpt_done = 0, None
    for at, piece in pieces:
        received += len(piece)
        if first_rcpt_done is None and received >= 2 * len(replies.RECIPIENT_OK.wire):
            first_rcpt_done = at  # MAIL's reply and the first RCPT's are both in
    assert first_rcpt_done is not None and first_rcpt_done >= 0.5, pieces  # not at once
    assert pieces[-1][0] >= 1.4, pieces


def done_at(pieces: list[tuple[float, bytes]], octets: int) -> float:
    """When the first `octets` octets of what `arrivals` saw had all come."""
    received = 0
    for at, piece in pieces:
        received += len(piece)
        if received >= octets:
            return at
    raise AssertionError((octets, pieces))


def test_replies_after_a_tarpitted_one_go_at_full_speed(make_server, raw_clients):
    """MAIL and four RCPTs in one segment, the rule firing for the first and third:
    each of those two trickles (14 bytes at 20 bytes/s, 0.65 s), in order; the reply
    after each comes right after it, not trickled."""
    server = make_server({"server": {"workers": 1}, "delivery": {"backend": "discard"},
                          "faults": {"rules": [{"name": "slow", "stage": "rcpt",
                                                "recipient": "*@tar.test", "tarpit": 20}]}})
    client = raw_clients(server.port)
    client.hello()
    client.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<a@tar.test>\r\n"
                b"RCPT TO:<b@example.org>\r\nRCPT TO:<c@tar.test>\r\n"
                b"RCPT TO:<d@example.org>\r\n")
    size = len(replies.RECIPIENT_OK.wire)
    pieces = arrivals(client.sock, replies.SENDER_OK.wire + replies.RECIPIENT_OK.wire * 4)
    mail, first, after_first, second, after_second = (
        done_at(pieces, len(replies.SENDER_OK.wire) + n * size) for n in range(5))
    assert mail < 0.5, pieces
    assert first - mail >= 0.4 and second - after_first >= 0.4, pieces  # both trickled
    assert after_first - first < 0.3 and after_second - second < 0.3, pieces


def test_a_reply_after_a_tarpitted_deferred_commit_goes_at_full_speed(make_server,
                                                                      raw_clients):
    """The message's 250, tarpitted at 20 bytes/s, comes after a commit made off the
    loop (fsync); QUIT, sent with the final dot, is answered right after it."""
    server = make_server({"server": {"workers": 1}, "delivery": {"fsync": True},
                          "faults": {"rules": [{"name": "slow-250", "stage": "end_of_data",
                                                "tarpit": 20}]}})
    client = raw_clients(server.port, timeout=30)
    client.hello()
    client.send(client.envelope("s@example.org", ["r@example.org"]))
    for code in (250, 250, 354):
        client.expect(code)
    client.send(client.stuff(BODY) + b"QUIT\r\n")
    pieces = arrivals(client.sock, replies.CLOSING.wire)
    got = b"".join(piece for _, piece in pieces)
    assert got.startswith(b"250 2.0.0 Ok: queued as ") and got.endswith(replies.CLOSING.wire)
    stored = done_at(pieces, len(got) - len(replies.CLOSING.wire))
    assert stored >= 0.5 * (len(got) - len(replies.CLOSING.wire)) / 20, pieces
    assert done_at(pieces, len(got)) - stored < 0.3, pieces
    assert len(server.files("new")) == 1


@pytest.mark.parametrize("bps", [15, 19])
def test_a_tarpit_keeps_to_a_rate_that_is_no_multiple_of_ten(make_server, raw_clients,
                                                            bps):
    """A 42-byte reply at 15 (19) bytes/s: a byte at once, then the rest at the rate,
    2.7 (2.2) s; rounded down to 10 bytes/s it took 4.1 s."""
    text = "4.2.0 " + "x" * 30  # "450 " + 36 + CRLF: 42 bytes
    server = make_server({"server": {"workers": 1}, "delivery": {"backend": "discard"},
                          "faults": {"rules": [{"name": "slow", "stage": "rcpt",
                                                "reply": f"450 {text}", "tarpit": bps}]}})
    client = raw_clients(server.port, timeout=30)
    client.hello()
    client.cmd("MAIL FROM:<s@example.org>", 250)
    started = time.monotonic()
    client.send(b"RCPT TO:<r@example.org>\r\n")
    reply = client.expect(450, timeout=30)
    elapsed = time.monotonic() - started
    ideal = (len(reply.raw) - 1) / bps
    assert ideal - 0.05 <= elapsed <= ideal + 0.4, (elapsed, ideal)


def test_a_tarpitted_354_starts_the_data_clocks_when_it_is_out(make_server, raw_clients):
    """The 354 trickled at 5 bytes/s takes about 7 s, longer than min_data_rate's grace
    (2 s here): the body that follows at once, 30 bytes in half a second, is the
    client's first chance to send, and is stored, not cut off with 421."""
    server = make_server({"server": {"workers": 1}, "delivery": {"backend": "discard"},
                          "limits": {"min_data_rate": 500, "min_data_rate_grace": "2s"},
                          "faults": {"rules": [{"name": "slow-354", "stage": "data",
                                                "tarpit": 5}]}})
    client = raw_clients(server.port, timeout=30)
    client.hello()
    client.send(client.envelope("s@example.org", ["r@example.org"]))
    client.expect(250)
    client.expect(250)
    started = time.monotonic()
    client.expect(354, timeout=30)
    assert time.monotonic() - started > 2
    client.send(b"Subject: hello\r\n")
    time.sleep(0.5)
    client.send(b"\r\nbody\r\n.\r\n")
    assert client.reply(timeout=10).code == 250


def _whole_message_sent(make_server, raw_clients, rule: dict, *, fsync: bool = False,
                        after: bytes = b"", overrides: dict | None = None):
    """A server of one worker with the one fault `rule`, and a client that has sent it a
    whole message (the dot included), and `after` in the same segment: (server, client)."""
    server = make_server({"server": {"workers": 1}, "delivery": {"fsync": fsync},
                          "faults": {"rules": [rule]}, **(overrides or {})})
    client = raw_clients(server.port)
    client.hello()
    client.send(client.envelope("s@example.org", ["r@example.org"]))
    for code in (250, 250, 354):
        client.expect(code)
    client.send(client.stuff(BODY) + after)
    return server, client


def _delayed_at_its_end(delay_s: float) -> dict:
    """The rule `slow`: every end_of_data answered `delay_s` late."""
    return {"name": "slow", "stage": "end_of_data", "delay": delay_s}


def test_a_client_that_left_during_an_end_of_data_delay_has_nothing_stored(
        make_server, raw_clients):
    """The client gives up while the message's answer is delayed and resets the
    connection: when the delay ends the message is dropped, not stored nor counted as
    accepted (the client never saw a 250, and its retry would store it twice), and the
    log says why."""
    port = free_port()
    server, client = _whole_message_sent(make_server, raw_clients, _delayed_at_its_end(1),
                                         overrides={"stats": {"listen": f"{HOST}:{port}"}})
    time.sleep(0.2)  # the dot is in: the delay runs
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # a reset
    server.wait_for_log(r"disconnect from .* end=client left during the delay of fault "
                        r"rule slow")
    assert "result=client left during a delay" in server.log_text()
    assert server.files("new") == [] and server.files("tmp") == []
    def published() -> dict | None:
        doc = stats_doc(port)
        return doc if doc["faults"] and doc["connections"]["open"] == 0 else None

    doc = server.wait_until(published, STATS_WAIT_S, 0.1, "the counters")
    assert doc["messages_accepted"] == 0 and doc["faults"] == {"slow": 1}, doc


@pytest.mark.parametrize("stage", ["rcpt", "quit"])
def test_a_client_that_left_during_a_delay_is_closed_unanswered(make_server, raw_clients,
                                                                stage):
    server = make_server({"server": {"workers": 1}, "delivery": {"backend": "discard"},
                          "faults": {"rules": [{"name": "slow", "stage": stage,
                                                "delay": 0.5}]}})
    client = raw_clients(server.port)
    client.hello()
    client.cmd("MAIL FROM:<s@example.org>", 250)
    client.send(b"RCPT TO:<r@example.org>\r\n" if stage == "rcpt" else b"QUIT\r\n")
    time.sleep(0.1)
    client.close()
    server.wait_for_log(r"disconnect from .* end=client left during the delay of fault "
                        r"rule slow")


def test_a_client_that_shut_its_side_after_the_dot_gets_its_message_stored(
        make_server, raw_clients):
    """`nc -N` sends the message whole, then shuts its side and waits for the answer:
    at the end of an end_of_data delay all there is to read of it is its end of stream,
    which is no leaving there. The message is stored and the 250 goes out."""
    server, client = _whole_message_sent(make_server, raw_clients, _delayed_at_its_end(0.5))
    client.sock.shutdown(socket.SHUT_WR)
    assert client.expect(250, timeout=5).raw.startswith(b"250 2.0.0 Ok: queued as ")
    assert len(server.files("new")) == 1


def test_a_half_closed_client_with_a_pipelined_quit_is_not_gone(make_server, raw_clients):
    """The final dot and QUIT in one segment, then the client shuts its sending side and
    waits for the answers: the commands it sent are still to be read, so when the delay
    ends the message is stored and both replies go out."""
    server, client = _whole_message_sent(make_server, raw_clients, _delayed_at_its_end(0.5),
                                         after=b"QUIT\r\n")
    client.sock.shutdown(socket.SHUT_WR)
    assert client.expect(250, timeout=5).raw.startswith(b"250 2.0.0 Ok: queued as ")
    client.expect(221)
    assert len(server.files("new")) == 1


@pytest.mark.parametrize(("rule_sender", "mail_from", "fires"), [
    ("alice@*", "alice@example.org", True),  # the session's last message was alice's
    ("", "alice@example.org", False),  # "" is the null sender <>, not "no sender"
    ("", None, False),  # no MAIL at all: no sender to match
    ("", "", True),  # a bounce (MAIL FROM:<>) was the last message
])
def test_a_quit_rule_matches_the_sessions_last_sender(make_server, raw_clients,
                                                      rule_sender, mail_from, fires):
    server = make_server({"server": {"workers": 1}, "delivery": {"backend": "discard"},
                          "faults": {"rules": [{"name": "q", "stage": "quit",
                                                "sender": rule_sender, "reply": REFUSED}]}})
    client = raw_clients(server.port)
    client.hello()
    if mail_from is not None:
        assert client.send_message(BODY, sender=mail_from).code == 250
    client.send(b"QUIT\r\n")
    assert client.reply().raw == (REFUSED.encode() + b"\r\n" if fires else replies.CLOSING.wire)


def test_a_connect_delay_that_ends_while_stopping_greets_with_one_421(make_server,
                                                                     raw_clients):
    server = make_server({"server": {"workers": 1, "shutdown_timeout": "10s"},
                          "delivery": {"backend": "discard"},
                          "faults": {"rules": [{"name": "slow-greeting", "stage": "connect",
                                                "delay": 1}]}})
    client = raw_clients(server.port)
    time.sleep(0.2)  # accepted, its greeting delayed
    server.send_signal(signal.SIGTERM)
    assert client.wait_closed(timeout=5) == replies.SHUTTING_DOWN.wire


def test_reply_at_end_of_data_stores_nothing(make_server, raw_clients):
    server = make_server({"server": {"workers": 1}, "faults": {"rules": [
        {"name": "refuse-body", "stage": "end_of_data", "recipient": "*@reject.test",
         "reply": REFUSED}]}})
    client = raw_clients(server.port)
    client.hello()
    assert client.send_message(BODY, recipients=("r@reject.test",)).raw == (
        REFUSED.encode() + b"\r\n")
    assert server.files("new") == [] and server.files("tmp") == []
    assert client.send_message(BODY, recipients=("r@accept.test",)).code == 250  # session goes on
    client.cmd("QUIT", 221)
    assert len(server.files("new")) == 1 and server.files("tmp") == []


# --- statistics -------------------------------------------------------------------------

def test_metrics_are_strict_prometheus_text_and_match_the_traffic(make_server, raw_clients):
    server, port = stats_server(make_server)
    tally = Tally()
    run_traffic(server.port, raw_clients, tally)
    wait_for_counts(server, port, tally)
    status, content_type, body = http_get(port, "/metrics")
    assert status == 200 and content_type == "text/plain; version=0.0.4; charset=utf-8"
    m = parse_prometheus(body.decode("utf-8"))
    assert {name.removeprefix("minismtp_"): family.kind for name, family in m.items()} == {
        "workers": "gauge", "connections_open": "gauge", "connections_total": "counter",
        "transactions_total": "counter", "messages_accepted_total": "counter",
        "received_bytes_total": "counter", "rejections_total": "counter",
        "faults_injected_total": "counter", "end_of_data_seconds": "histogram",
        "tls_sessions_total": "counter", "tls_handshake_failures_total": "counter",
        "tls_plaintext_discarded_bytes_total": "counter", "tls_handshake_seconds": "histogram",
        "proxy_headers_total": "counter", "proxy_failures_total": "counter",
        "auth_total": "counter", "listener_sessions_total": "counter",
        "listener_messages_accepted_total": "counter", "per_client_refused_total": "counter",
        "per_client_unchecked_total": "counter"}
    # One listener, named by its address as configured: it saw every session.
    for family, count in (("sessions", tally.connections), ("messages_accepted", tally.accepted)):
        assert m[f"minismtp_listener_{family}_total"].samples == {
            ("", (("listener", f"{HOST}:0"),)): count}
    plain = ("workers", "connections_open", "connections_total", "transactions_total",
             "messages_accepted_total")
    assert [m[f"minismtp_{name}"].get() for name in plain] == [
        2, 0, tally.connections, tally.transactions, tally.accepted]
    assert m["minismtp_received_bytes_total"].get() >= tally.sent
    assert {dict(labels)["code"]: v for (_, labels), v
            in m["minismtp_rejections_total"].samples.items()} == {
        str(code): n for code, n in tally.rejections.items()}
    assert {dict(labels)["rule"]: v for (_, labels), v
            in m["minismtp_faults_injected_total"].samples.items()} == tally.expected()["faults"]
    histogram = m["minismtp_end_of_data_seconds"]
    assert histogram.get("_count") == tally.end_of_data and histogram.get("_sum") > 0


def test_stats_json_and_stats_command_show_the_same_numbers(make_server, raw_clients):
    server, port = stats_server(make_server)
    tally = Tally()
    run_traffic(server.port, raw_clients, tally)
    doc = wait_for_counts(server, port, tally)
    m = parse_prometheus(http_get(port, "/metrics")[2].decode())
    assert doc["workers"] == m["minismtp_workers"].get() == 2
    assert doc["bytes_received"] == m["minismtp_received_bytes_total"].get() >= tally.sent
    histogram = m["minismtp_end_of_data_seconds"]
    buckets = {dict(labels)["le"]: v for (suffix, labels), v in histogram.samples.items()
               if suffix == "_bucket"}
    assert doc["end_of_data_seconds"]["buckets"] == buckets
    assert doc["end_of_data_seconds"]["sum"] == histogram.get("_sum")
    result = subprocess.run(
        [sys.executable, "-m", "minismtp", "stats", "--config", str(server.config_path),
         "--once"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    totals = dict(re.findall(r"^(\S+(?: \S+)*) {2,}(\S+)", result.stdout, re.M))
    assert totals["connections"] == str(tally.connections), result.stdout
    assert totals["transactions"] == str(tally.transactions)
    assert totals["messages accepted"] == str(tally.accepted)
    for code, count in tally.rejections.items():
        assert totals[f"rejected {code}"] == str(count)
    for name, count in tally.expected()["faults"].items():
        assert totals[f"fault {name}"] == str(count)


def test_stats_command_without_stats_listen_exits_2(tmp_path):
    config = tmp_path / "nostats.yaml"
    config.write_text("server:\n  listen: [\"127.0.0.1:0\"]\n")
    result = subprocess.run(
        [sys.executable, "-m", "minismtp", "stats", "--config", str(config), "--once"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", f"minismtp: stats.listen is not set in {config}\n")


def test_counters_survive_workers_being_replaced(make_server, raw_clients):
    server, port = stats_server(make_server)
    tally = Tally()
    run_traffic(server.port, raw_clients, tally)
    before = wait_for_counts(server, port, tally)

    def watch(done, what: str) -> None:
        """Sample /stats until `done()`; every sample must still show all the traffic."""
        deadline = time.monotonic() + 10
        while True:
            doc = stats_doc(port)
            assert counted(doc) == tally.expected(), f"counters went back during {what}"
            assert doc["bytes_received"] == before["bytes_received"], what
            if done(doc):
                return
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    first = set(server.worker_pids())
    server.send_signal(signal.SIGTTOU)  # one worker retires gracefully
    watch(lambda doc: doc["workers"] == 1 and len(server.worker_pids()) == 1, "TTOU")
    server.send_signal(signal.SIGTTIN)
    watch(lambda doc: doc["workers"] == 2 and len(server.worker_pids()) == 2, "TTIN")
    mark = server.mark()
    server.send_signal(signal.SIGHUP)  # a new generation; the old one retires
    server.wait_for_log(r"reloaded .*generation 1", 5, since=mark)
    watch(lambda doc: (lambda pids: len(pids) == 2 and not pids & first)(
        set(server.worker_pids())) and doc["workers"] == 2, "HUP")
    run_traffic(server.port, raw_clients, tally)  # the new workers add to the same totals
    wait_for_counts(server, port, tally)


def test_sigterm_logs_a_run_summary_with_the_message_count(make_server, raw_clients):
    server, _ = stats_server(make_server, workers=1)
    client = raw_clients(server.port)
    client.hello()
    for _ in range(3):
        assert client.send_message(BODY).code == 250
    client.cmd("QUIT", 221)
    client.close()
    assert server.stop() == 0  # at once: the worker's last counts are published at exit
    server.wait_for_log(r"run summary: 3 messages accepted, \d+\.\d MB received in ", 5)
